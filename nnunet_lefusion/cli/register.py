"""``nnUNetv2_lefusion_register``: make ``nnUNetv2_train/predict -tr nnUNetTrainerLeFusion`` find the trainers."""
from __future__ import annotations

import argparse

from nnunet_lefusion.cli.common import cli_main
from nnunet_lefusion.nnunet.register import register, unregister


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_lefusion_register",
        description="Place (or with --remove, delete) the one-line stub that lets nnU-Net's trainer lookup find "
                    "nnUNetTrainerLeFusion and its variants. Idempotent. Run --remove before uninstalling.")
    parser.add_argument("--remove", action="store_true", help="remove the stub instead")
    parser.add_argument("--ext-dir", default=None,
                        help="write the stub into this folder (for nnUNet_extTrainer) instead of nnunetv2's own "
                             "trainer folder")
    args = parser.parse_args(argv)
    if args.remove:
        path, changed = unregister(args.ext_dir)
        print(f"removed {path}" if changed else f"nothing to remove at {path}")
    else:
        path, changed = register(args.ext_dir)
        print(f"registered LeFusion trainers: {path}" if changed else f"already registered: {path}")
