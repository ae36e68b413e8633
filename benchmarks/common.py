"""Shared set-up for benchmarks: a phantom dataset planned and preprocessed by nnU-Net in a work folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*cmd: str) -> None:
    """Run a console script of this environment, failing loudly."""
    subprocess.run([str(BIN / cmd[0]), *cmd[1:]], check=True, stdout=subprocess.DEVNULL)


def prepare_phantom(work: Path, dataset_id: int, num_cases: int, configurations: list[str], fov: str = "heart",
                    seed: int = 0) -> str:
    """Export nnU-Net folders under ``work``; make, plan and preprocess a phantom dataset once; return its name."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = str(work / key)
        (work / key).mkdir(parents=True, exist_ok=True)
    raw = list((work / "nnUNet_raw").glob(f"Dataset{dataset_id:03d}_*"))
    if not raw:
        run("nnUNetv2_lefusion_phantom", "-d", str(dataset_id), "-n", str(num_cases), "--fov", fov,
            "--seed", str(seed))
    missing = [c for c in configurations
               if not list((work / "nnUNet_preprocessed").glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans_{c}"))]
    if missing:
        run("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *missing, "-np", "2", "-npfp", "2")
    return next((work / "nnUNet_raw").glob(f"Dataset{dataset_id:03d}_*")).name
