"""Shared helpers for the command-line entry points."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from nnunet_lefusion.errors import LeFusionError


def cli_main(func: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], int]:
    """Wrap an entry point so that a ``LeFusionError`` becomes one error line and exit code 2."""

    @functools.wraps(func)
    def wrapper(argv: list[str] | None = None) -> int:
        prog = os.path.basename(sys.argv[0]) or func.__module__
        try:
            func(argv)
        except LeFusionError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130)
        return 0

    return wrapper
