"""Make nnU-Net's trainer lookup find the LeFusion trainers: a one-line stub module that imports the real classes.

nnU-Net imports every top-level module of ``nnunetv2/training/nnUNetTrainer/`` before any subpackage, so a stub
placed there is found without importing the subpackages that need torchvision (broken on CPU-only installs), and
works with every nnunetv2 2.x. The stub can also go into a folder named by ``nnUNet_extTrainer`` (nnunetv2 >= 2.8).
The classes stay in this installed package, so they pickle.
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_lefusion.errors import LeFusionError

STUB_NAME = "nnUNetTrainerLeFusion.py"
STUB_SOURCE = '''"""nnunet-lefusion trainer stub (nnUNetv2_lefusion_register): the LeFusion trainers for nnU-Net."""
try:
    from nnunet_lefusion.nnunet.trainer import *  # noqa: F401,F403
except ModuleNotFoundError as exc:  # nnunet-lefusion uninstalled: define nothing, nnU-Net finds its other trainers
    if (exc.name or "").split(".")[0] != "nnunet_lefusion":
        raise
'''


def nnunet_trainer_folder() -> Path:
    """``nnunetv2/training/nnUNetTrainer`` of the nnunetv2 this interpreter imports."""
    import nnunetv2

    return Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer"


def register(folder: Path | None = None) -> tuple[Path, bool]:
    """Write the stub into ``folder`` (default: nnU-Net's trainer folder); returns (path, whether it changed)."""
    path = Path(folder or nnunet_trainer_folder()) / STUB_NAME
    if path.is_file() and path.read_text() == STUB_SOURCE:
        return path, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{STUB_NAME}.{os.getpid()}.tmp")  # concurrent registrations do not collide
        tmp.write_text(STUB_SOURCE)
        tmp.replace(path)
    except OSError as exc:
        raise LeFusionError(f"cannot write the trainer stub {path}: {exc.strerror}") from None
    return path, True


def unregister(folder: Path | None = None) -> tuple[Path, bool]:
    """Remove the stub (and its compiled copies); returns (path, whether something was removed)."""
    path = Path(folder or nnunet_trainer_folder()) / STUB_NAME
    existed = path.is_file()
    try:
        path.unlink(missing_ok=True)
        for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            cached.unlink()
    except OSError as exc:
        raise LeFusionError(f"cannot remove the trainer stub {path}: {exc.strerror}") from None
    return path, existed
