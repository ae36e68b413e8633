"""End to end with real nnU-Net: synthesize -> nnUNetv2_train -tr nnUNetTrainerLeFusion* -> nnUNetv2_predict."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_lefusion.nnunet.context import DatasetContext
from tests.nnunet_helpers import BIN, latest_training_log, run_cli

pytestmark = pytest.mark.slow
SHORT = {"LEFUSION_EPOCHS": "1", "LEFUSION_VAL_ITERS": "2"}


def train(dataset: str, configuration: str, trainer: str, env: dict) -> Path:
    run_cli("nnUNetv2_train", "990", configuration, "0", "-tr", trainer, "-device", "cpu", env={**SHORT, **env})
    fold = Path(os.environ["nnUNet_results"], dataset, f"{trainer}__nnUNetPlans__{configuration}", "fold_0")
    assert (fold / "checkpoint_final.pth").is_file()
    return fold


def check_validation_is_real(fold: Path, dataset: str, configuration: str) -> None:
    val = DatasetContext(dataset, configuration, 0).split[1]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    predicted = sorted(Path(c["prediction_file"]).name for c in summary["metric_per_case"])
    assert predicted == sorted(f"{v}.nii.gz" for v in val)


def test_3d_fullres_trains_with_synthetic_cases_at_the_rate_and_predicts(phantom_dataset, nnunet_dirs, tmp_path):
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "16", "--overwrite")
    fold = train(phantom_dataset, "3d_fullres", "nnUNetTrainerLeFusion_short",
                 {"LEFUSION_RATE": "0.5", "LEFUSION_ITERS": "12"})
    stats = json.loads((fold / "lefusion_stats.json").read_text())
    assert stats["settings"]["rate"] == 0.5
    fraction = stats["total_synthetic"] / stats["total_loads"]
    assert stats["total_loads"] >= 24 and 0.25 <= fraction <= 0.75, stats
    log = latest_training_log(fold)
    assert "training-case loads were synthetic" in log
    check_validation_is_real(fold, phantom_dataset, "3d_fullres")

    images = sorted((Path(nnunet_dirs["nnUNet_raw"]) / phantom_dataset / "imagesTr").glob("*_0000.nii.gz"))[:2]
    inp = tmp_path / "in"
    inp.mkdir()
    for img in images:
        (inp / img.name).symlink_to(img)
    run_cli("nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-d", "990", "-c", "3d_fullres",
            "-f", "0", "-tr", "nnUNetTrainerLeFusion_short", "-device", "cpu", "--disable_tta")
    for img in images:
        pred = sitk.ReadImage(str(tmp_path / "out" / img.name.replace("_0000", "")))
        ref = sitk.ReadImage(str(img))
        assert pred.GetSize() == ref.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3, 4}


def test_2d_trains_with_all_synthetic(phantom_dataset):
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "2d", "-f", "0", "-n", "8", "--overwrite")
    fold = train(phantom_dataset, "2d", "nnUNetTrainerLeFusion_short", {"LEFUSION_RATE": "1", "LEFUSION_ITERS": "8"})
    stats = json.loads((fold / "lefusion_stats.json").read_text())
    assert stats["total_loads"] > 0 and stats["total_synthetic"] == stats["total_loads"]
    check_validation_is_real(fold, phantom_dataset, "2d")


def test_control_has_no_synthetic_case_and_resumes_from_its_5_epoch_checkpoint(phantom_dataset):
    """The control (rate 0) loads no synthetic case. An interrupted short run (benchmark, demo) continues with
    ``--c`` from its last 5-epoch checkpoint, which is whole even though the run is killed the moment the file
    appears (it is written under another name, then renamed)."""
    trainer = "nnUNetTrainerLeFusion_r000_short"
    fold = Path(os.environ["nnUNet_results"], phantom_dataset, f"{trainer}__nnUNetPlans__2d", "fold_0")
    env = {**os.environ, "LEFUSION_EPOCHS": "7", "LEFUSION_ITERS": "2", "LEFUSION_VAL_ITERS": "1"}
    cmd = [str(BIN / "nnUNetv2_train"), "990", "2d", "0", "-tr", trainer, "-device", "cpu"]
    shutil.rmtree(fold, ignore_errors=True)  # a fresh run
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 600
    while not (fold / "checkpoint_latest.pth").is_file():
        assert first.poll() is None and time.time() < deadline, "no checkpoint_latest.pth before the run ended"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)   # with its augmentation workers, which would outlive it
    first.wait()
    assert not (fold / "checkpoint_final.pth").exists()
    run_cli("nnUNetv2_train", *cmd[1:], "--c", env=env)
    epochs = re.findall(r"Epoch (\d+) *$", latest_training_log(fold), re.MULTILINE)
    assert epochs == ["5", "6"]  # the resumed run starts after the checkpoint of epoch 5
    assert (fold / "checkpoint_final.pth").is_file()
    stats = json.loads((fold / "lefusion_stats.json").read_text())
    assert stats["total_loads"] > 0 and stats["total_synthetic"] == 0
