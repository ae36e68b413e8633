"""The one exception type for failures a user can cause (bad input, mismatched files)."""
from __future__ import annotations

import os
import sys


class LeFusionError(Exception):
    """A user-facing error; the command-line layer prints its message as one line and exits non-zero."""


class LeFusionExit(LeFusionError, SystemExit):
    """A ``LeFusionError`` raised where no ``cli_main`` of ours catches it (the trainer inside nnU-Net's own
    ``nnUNetv2_train``): the message is printed as one ``prog: error: ...`` line when it is raised, and, left
    uncaught, it ends the process quietly with exit code 2 (a ``SystemExit``: no traceback). Code that calls the
    trainer itself can still catch it as a ``LeFusionError``."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.code = 2
        prog = prog or os.path.basename(sys.argv[0]) or "nnUNetv2_train"
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
