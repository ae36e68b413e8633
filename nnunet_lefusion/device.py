"""Which torch device to use: nnU-Net's default rule, and a device name checked against this machine."""
from __future__ import annotations

from nnunet_lefusion.errors import LeFusionError


def default_device() -> str:
    """nnU-Net's rule: CUDA when there is a GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None, nnunet: bool = False) -> str:
    """The device to use: ``name`` (a ``-device`` argument) or :func:`default_device`; a
    ``LeFusionError`` for a name torch does not know, a device this machine lacks, or (``nnunet``) one nnU-Net's
    ``-device`` does not take."""
    import torch

    device = name or default_device()
    if nnunet and device not in ("cpu", "cuda", "mps"):
        raise LeFusionError(f"-device {device}: nnU-Net takes cpu, cuda or mps (pick the GPU with "
                            f"CUDA_VISIBLE_DEVICES)")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise LeFusionError(f"unknown device {device!r}: use cpu, cuda or cuda:i") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LeFusionError(f"-device {device}: CUDA is not available on this machine; use -device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LeFusionError(f"-device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise LeFusionError(f"-device {device}: MPS is not available on this machine; use -device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise LeFusionError(f"unsupported device {device!r}: use cpu, cuda or cuda:i")
    return device
