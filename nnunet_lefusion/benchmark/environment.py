"""What a benchmark run ran on: the processor, the precision, the code version and the package versions, recorded
in every run's ``metrics.json`` so that a comparison can show it never mixed them."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("nnunet-lefusion", "nnunetv2", "torch", "numpy", "SimpleITK", "batchgeneratorsv2")


def processor(device: str) -> str:
    """The CPU model (``/proc/cpuinfo``; else the platform's name), or the GPU's name on a CUDA device."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision(device: str, cpu_bf16: bool) -> str:
    """nnU-Net's training precision: fp16 autocast on CUDA (nnU-Net's AMP), bf16 autocast on a CPU where the
    trainer's ``cpu_bf16`` applied, else fp32."""
    if device.startswith("cuda"):
        return "fp16 autocast"
    return "bf16 autocast" if cpu_bf16 else "fp32"


def code_version() -> str:
    """The git commit of this package's checkout, with ``+dirty`` for uncommitted changes to tracked files; the
    installed version where it is not a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"nnunet-lefusion {package_versions().get('nnunet-lefusion')}"
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run's figures depend on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe(device: str, cpu_bf16: bool) -> dict:
    """Everything above, as a run's ``metrics.json`` records it."""
    return {"processor": processor(device), "device": device, "precision": precision(device, cpu_bf16),
            "commit": code_version(), "packages": package_versions()}
