"""Shared helpers for the command-line entry points."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable

from nnunet_lefusion.device import check_device, default_device  # noqa: F401 (the commands' helpers)
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


def seed_value(text: str) -> int:
    """argparse type of ``--seed``: an integer >= 0 (numpy's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def add_device_argument(parser, nnunet: bool = False) -> None:
    """``-device`` as in nnU-Net (``--device`` kept as an alias), defaulting to :func:`default_device`;
    ``nnunet``: the device is handed to nnU-Net's commands, which take cpu, cuda or mps only."""
    parser.add_argument("-device", "--device", dest="device", default=None,
                        help=("cpu, cuda or mps (the GPU: CUDA_VISIBLE_DEVICES)" if nnunet else "cpu, cuda or cuda:i")
                        + " (default: cuda when available, else cpu)")


def add_parts_arguments(parser, what: str, together: str) -> None:
    """``-num_parts`` / ``-part_id`` as in ``nnUNetv2_predict``: ``what`` is split, the parts give ``together``."""
    parser.add_argument("-num_parts", type=int, default=1,
                        help=f"split {what} into parts, as nnUNetv2_predict does: run the same command once per "
                             f"-part_id, at the same time (other processes or machines sharing the output folder); "
                             f"together they give {together} (default 1)")
    parser.add_argument("-part_id", type=int, default=0, help="which part this process runs, 0 .. -num_parts - 1")


def add_raw_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``-o/--output-root`` and ``--overwrite`` of a command that writes an nnU-Net raw dataset."""
    parser.add_argument("-o", "--output-root", help="folder to write the dataset into (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")


def raw_output_root(args: argparse.Namespace) -> str:
    """Where the dataset goes: ``--output-root`` or ``$nnUNet_raw``; a ``LeFusionError`` if neither is given."""
    root = args.output_root or os.environ.get("nnUNet_raw")
    if not root:
        raise LeFusionError("nnUNet_raw is not set; export it or pass -o/--output-root")
    return root
