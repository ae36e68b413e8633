"""The trainer's dataset hook, in process, on the real preprocessed phantom and a real cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_lefusion.config import ENV_VARIABLES, TrainerSettings, write_settings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.cache import default_cache_folder
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.dataset import SyntheticMixDataset
from nnunet_lefusion.nnunet.run_settings import SETTINGS_FILE, LeFusionRun
from nnunet_lefusion.nnunet.trainer import nnUNetTrainerLeFusion, nnUNetTrainerLeFusion_r000
from tests.nnunet_helpers import BIN, error_lines, run_cli


@pytest.fixture(scope="module")
def cache_folder(phantom_dataset) -> Path:
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "8", "--overwrite")
    return default_cache_folder(DatasetContext(phantom_dataset, "3d_fullres", 0))


def make_trainer(cls, dataset: str, fold: int = 0, configuration: str = "3d_fullres"):
    """The trainer as nnUNetv2_train builds it (class looked up by name through the registered stub)."""
    return get_trainer_from_args(dataset, configuration, fold, cls.__name__, device=torch.device("cpu"))


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_rate_one_serves_synthetic_training_cases_and_real_validation(phantom_dataset, cache_folder, clean_env):
    clean_env.setenv("LEFUSION_RATE", "1")
    trainer = make_trainer(nnUNetTrainerLeFusion, phantom_dataset)
    tr, val = trainer.get_tr_and_val_datasets()
    assert isinstance(tr, SyntheticMixDataset) and type(val) is nnUNetDatasetBlosc2
    for identifier in tr.identifiers:
        props = tr.load_case(identifier)[3]
        assert props["lefusion"]["source"] in tr.variants
    for identifier in val.identifiers:
        assert "lefusion" not in val.load_case(identifier)[3]
    assert trainer.lefusion_counters.snapshot() == (len(tr.identifiers), len(tr.identifiers))


def test_rate_is_the_share_of_synthetic_loads_when_only_some_cases_have_variants(phantom_dataset, cache_folder,
                                                                                clean_env):
    clean_env.setenv("LEFUSION_RATE", "0.5")
    trainer = make_trainer(nnUNetTrainerLeFusion, phantom_dataset)
    tr, _ = trainer.get_tr_and_val_datasets()
    tr.variants = dict(list(tr.variants.items())[:2])   # as if the cache held variants of two training cases only
    assert len(tr.variants) == 2 < len(tr.identifiers)
    np.random.seed(0)
    sources = {tr.load_case(i)[3].get("lefusion", {}).get("source") for _ in range(40) for i in tr.identifiers}
    loads, synthetic = trainer.lefusion_counters.snapshot()
    assert loads == 40 * len(tr.identifiers) and abs(synthetic / loads - 0.5) < 0.075, (synthetic, loads)
    assert sources - {None} == set(tr.variants), "every variant source is served"


def test_control_uses_same_path_without_synthesis(phantom_dataset, cache_folder, clean_env):
    clean_env.setenv("LEFUSION_RATE", "1")  # the _r000 name fixes the rate; the environment cannot change it
    trainer = make_trainer(nnUNetTrainerLeFusion_r000, phantom_dataset)
    tr, _ = trainer.get_tr_and_val_datasets()
    assert isinstance(tr, SyntheticMixDataset)
    assert all("lefusion" not in tr.load_case(i)[3] for i in tr.identifiers)
    assert trainer.lefusion_counters.snapshot() == (len(tr.identifiers), 0)


def test_missing_cache_with_positive_rate_is_an_error(phantom_dataset, cache_folder, clean_env, tmp_path):
    clean_env.setenv("LEFUSION_CACHE", str(tmp_path / "nowhere"))
    with pytest.raises(LeFusionError, match="no synthetic cache"):
        make_trainer(nnUNetTrainerLeFusion, phantom_dataset).get_tr_and_val_datasets()


def test_cache_of_another_fold_or_other_plans_is_refused(phantom_dataset, cache_folder, clean_env, tmp_path):
    clean_env.setenv("LEFUSION_CACHE", str(cache_folder))
    with pytest.raises(LeFusionError, match="fold 0"):
        make_trainer(nnUNetTrainerLeFusion, phantom_dataset, fold=1).get_tr_and_val_datasets()
    other = tmp_path / "other_plans"
    shutil.copytree(cache_folder, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["plans_fingerprint"] = "0" * 16
    (other / "manifest.json").write_text(json.dumps(manifest))
    clean_env.setenv("LEFUSION_CACHE", str(other))
    with pytest.raises(LeFusionError, match="other plans"):
        make_trainer(nnUNetTrainerLeFusion, phantom_dataset).get_tr_and_val_datasets()


def test_cpu_bf16_runs_the_steps_of_the_real_network_in_bf16(phantom_dataset, clean_env):
    """``LEFUSION_CPU_BF16=1``: on a CPU device the train and validation steps run the network under bf16 autocast
    (nnU-Net autocasts on CUDA only) and still return finite losses; without it the network runs in fp32."""
    clean_env.setenv("nnUNet_n_proc_DA", "0")
    for flag, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        clean_env.setenv("LEFUSION_CPU_BF16", flag)
        # 2d: a CPU without bf16 in hardware emulates it, and a 3d_fullres step then takes minutes
        trainer = make_trainer(nnUNetTrainerLeFusion_r000, phantom_dataset, configuration="2d")
        trainer.initialize()
        loader_tr, loader_val = trainer.get_dataloaders()
        outputs = []
        trainer.network.register_forward_hook(lambda module, args, out: outputs.append(out[0].dtype))
        trainer.network.train()
        loss = trainer.train_step(next(loader_tr))["loss"]
        trainer.network.eval()
        validation = trainer.validation_step(next(loader_val))
        assert outputs == [dtype, dtype]
        assert np.isfinite(loss) and np.isfinite(validation["loss"])
        assert validation["tp_hard"].sum() + validation["fn_hard"].sum() > 0


def test_settings_are_read_once_into_one_frozen_object(phantom_dataset, cache_folder, clean_env, tmp_path):
    """A settings file (as the benchmark and demo hand it over) with a variable on top; read once at construction:
    the short-run schedule comes from it, and a variable changed later reaches nothing."""
    config = write_settings(TrainerSettings(rate=1.0, cache=str(cache_folder), epochs=2, iterations=3,
                                            val_iterations=1), tmp_path / "lefusion.yaml")
    clean_env.setenv("LEFUSION_CONFIG", str(config))
    clean_env.setenv("LEFUSION_VAL_ITERS", "4")   # the variables still override the file
    trainer = get_trainer_from_args(phantom_dataset, "3d_fullres", 0, "nnUNetTrainerLeFusion_short",
                                    device=torch.device("cpu"))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (2, 3, 4)
    with pytest.raises(FrozenInstanceError):
        trainer.lefusion.rate = 0.0
    for var in ("LEFUSION_RATE", "LEFUSION_CACHE", "LEFUSION_ITERS"):
        clean_env.setenv(var, "0")
    tr, _ = trainer.get_tr_and_val_datasets()
    assert all(tr.load_case(i)[3]["lefusion"] for i in tr.identifiers), "rate 1 as read at construction"
    assert trainer.num_iterations_per_epoch == 3


def test_the_record_holds_the_generators_hashes_and_refuses_other_settings(phantom_dataset, cache_folder, clean_env,
                                                                           tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(cache_folder, cache)
    sampler = tmp_path / "sampler.pt"
    sampler.write_bytes(b"weights")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["runs"][0]["generators"] = [{"role": "sampler", "path": str(sampler), "training_data": None}]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    clean_env.setenv("LEFUSION_CACHE", str(cache))
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    run = LeFusionRun.resolve(ctx.plans, "3d_fullres", 0)
    record = run.record()
    assert (record["settings"]["mode"], record["settings"]["rate"], record["settings"]["cache"]) == \
        ("cache", 0.5, str(cache))
    assert record["generators"] == [{"role": "sampler", "path": str(sampler),
                                     "sha256": hashlib.sha256(b"weights").hexdigest()}]
    fold = tmp_path / "fold_0"
    fold.mkdir()
    run.write(fold)
    run.check_resume(fold)
    clean_env.setenv("LEFUSION_EPOCHS", "9")   # how long it trains may change on --c
    LeFusionRun.resolve(ctx.plans, "3d_fullres", 0).check_resume(fold)
    clean_env.setenv("LEFUSION_RATE", "0.8")
    with pytest.raises(LeFusionError, match="rate 0.5 -> 0.8"):
        LeFusionRun.resolve(ctx.plans, "3d_fullres", 0).check_resume(fold)
    clean_env.delenv("LEFUSION_RATE")
    sampler.write_bytes(b"other weights")   # the same file name, retrained
    with pytest.raises(LeFusionError, match="generator checkpoints"):
        LeFusionRun.resolve(ctx.plans, "3d_fullres", 0).check_resume(fold)


@pytest.mark.slow
def test_training_records_its_settings_and_continuing_under_others_is_refused(phantom_dataset, clean_env,
                                                                              tmp_path):
    """A real short nnUNetv2_train writes fold_0/lefusion_settings.json; ``--c`` with another rate stops with one
    error line and exit code 2, before training, the checkpoint untouched."""
    cache = tmp_path / "cache2d"
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "2d", "-f", "0", "-n", "2", "--cache", str(cache))
    trainer = "nnUNetTrainerLeFusion_short"
    env = {"LEFUSION_CACHE": str(cache), "LEFUSION_EPOCHS": "1", "LEFUSION_ITERS": "2", "LEFUSION_VAL_ITERS": "1",
           "nnUNet_n_proc_DA": "0"}
    command = ["nnUNetv2_train", "990", "2d", "0", "-tr", trainer, "-device", "cpu"]
    run_cli(*command, env=env)
    fold = Path(os.environ["nnUNet_results"], phantom_dataset,
                f"{trainer}__nnUNetPlans__2d", "fold_0")
    recorded = json.loads((fold / SETTINGS_FILE).read_text())
    assert (recorded["settings"]["rate"], recorded["settings"]["mode"], recorded["settings"]["method"],
            recorded["settings"]["cache"], recorded["generators"]) == (0.5, "cache", "copypaste", str(cache), [])
    checkpoint = (fold / "checkpoint_final.pth").stat().st_mtime_ns
    refused = subprocess.run([str(BIN / "nnUNetv2_train"), *command[1:], "--c"], capture_output=True, text=True,
                             env={**os.environ, **env, "LEFUSION_RATE": "1"})
    lines = error_lines(refused)
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert lines[0].startswith("nnUNetv2_train: error: --c refused") and "rate 0.5 -> 1.0" in lines[0]
    assert (fold / "checkpoint_final.pth").stat().st_mtime_ns == checkpoint
    assert json.loads((fold / SETTINGS_FILE).read_text()) == recorded
