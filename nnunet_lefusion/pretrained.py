"""The weights shipped in ``pretrained/``, and when a LeFusion run takes them without being told."""
from __future__ import annotations

from pathlib import Path

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.model.checkpoint import read_meta

FOLDER = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED = {"sampler": FOLDER / "lefusion_sampler_phantom.pt", "mask generator": FOLDER / "lesion_masks_phantom.pt"}
HOW_TO_TRAIN = {"sampler": ("--checkpoint", "nnUNetv2_lefusion_train_sampler"),
                "mask generator": ("--mask-generator", "nnUNetv2_lefusion_train_masks (or give 'rule')")}


def shipped_labels(role: str) -> LesionLabels:
    """The label roles the shipped ``role`` ("sampler" or "mask generator") was trained with."""
    return LesionLabels.from_dict(read_meta(SHIPPED[role]).extras["labels"])


def _flag_and_command(role: str, flag: str | None) -> tuple[str, str]:
    return flag or HOW_TO_TRAIN[role][0], HOW_TO_TRAIN[role][1]


def shipped_file(role: str, flag: str | None = None) -> Path:
    """The shipped ``role``'s file; ``LeFusionError`` naming the flag to give if it is not there."""
    if not SHIPPED[role].is_file():
        flag, command = _flag_and_command(role, flag)
        raise LeFusionError(f"no {flag} given and no shipped {role} in {FOLDER}: train one with {command}")
    return SHIPPED[role]


def default_generator(role: str, labels: LesionLabels, flag: str | None = None) -> str:
    """The shipped ``role`` for a dataset whose lesion and organ labels are the ones it learnt (Emidec: lesions 3
    and 4 in myocardium 2); ``LeFusionError`` naming the flag to give (``flag``, else the synthesize one)
    otherwise."""
    shipped = shipped_file(role, flag)
    known = shipped_labels(role)
    if (known.lesions, known.organ) != (labels.lesions, labels.organ):
        flag, command = _flag_and_command(role, flag)
        raise LeFusionError(f"no {flag} given, and the shipped {role} knows lesion labels {list(known.lesions)} in "
                            f"organ {list(known.organ)}, not {list(labels.lesions)} in {list(labels.organ)}: train "
                            f"one on your data with {command}")
    return str(shipped)
