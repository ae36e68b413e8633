"""Reference numbers produced by the official LeFusion code, kept inside the repository (tests/data/lefusion)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "lefusion"


def reference_numbers() -> dict:
    """The official schedule buffers, jump time lists and state-dict shapes."""
    return json.loads((REFERENCE_DIR / "lefusion_reference.json").read_text())


def tiny_reference() -> dict:
    """The official tiny denoiser: its config, state dict, inputs and output."""
    return torch.load(REFERENCE_DIR / "tiny_unet3d_reference.pt", weights_only=True)
