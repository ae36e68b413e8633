"""Shared fixtures: one small phantom dataset, planned and preprocessed by the real nnU-Net, per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nnunet_lefusion.nnunet.register import register
from tests.nnunet_helpers import run_cli

DATASET_ID = 990

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # parallel test processes (make test: pytest -n 2): one intra-op thread each, for them and their subprocesses;
    # two threads per process on two shared cores stall each other badly
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # nnU-Net's CPU commands take every core whatever OMP_NUM_THREADS says (torch.set_num_threads(cpu_count)); with
    # the other test process beside them, OpenMP's spin-waiting makes such a step 2.5x slower, waiting passively
    # costs nothing (two 2-thread trainings on 2 cores: 11.1 s each spinning, 4.1-4.6 passive, 2.3 alone)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory) -> dict[str, str]:
    """nnUNet_raw/_preprocessed/_results in a temp folder, exported for the session (and its subprocesses)."""
    root = tmp_path_factory.mktemp("nnunet")
    dirs = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in dirs.values():
        Path(path).mkdir()
    old = {k: os.environ.get(k) for k in dirs}
    os.environ.update(dirs)
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    register()
    yield dirs
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def phantom_dataset(nnunet_dirs) -> str:
    """Dataset990: 10 heart-FOV phantom cases, planned and preprocessed for 2d and 3d_fullres."""
    run_cli("nnUNetv2_lefusion_phantom", "-d", str(DATASET_ID), "-n", "10", "--fov", "heart", "--seed", "0")
    run_cli("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "2", "-npfp", "2")
    return next(Path(nnunet_dirs["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*")).name


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for model tests: on two shared cores, two OpenMP threads stall each other badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
