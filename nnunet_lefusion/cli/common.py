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


def default_device() -> str:
    """nnU-Net's rule: CUDA when there is a GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_argument(parser) -> None:
    """``-device`` as in nnU-Net (``--device`` kept as an alias), defaulting to :func:`default_device`."""
    parser.add_argument("-device", "--device", dest="device", default=None,
                        help="cpu, cuda or cuda:i (default: cuda when available, else cpu)")
