"""The trainer's dataset hook, in process, on the real preprocessed phantom and a real cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.cache import default_cache_folder
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.dataset import SyntheticMixDataset
from nnunet_lefusion.nnunet.trainer import nnUNetTrainerLeFusion, nnUNetTrainerLeFusion_r000
from tests.nnunet_helpers import run_cli


@pytest.fixture(scope="module")
def cache_folder(phantom_dataset) -> Path:
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "8", "--overwrite")
    return default_cache_folder(DatasetContext(phantom_dataset, "3d_fullres", 0))


def make_trainer(cls, dataset: str, fold: int = 0):
    """The trainer as nnUNetv2_train builds it (class looked up by name through the registered stub)."""
    return get_trainer_from_args(dataset, "3d_fullres", fold, cls.__name__, device=torch.device("cpu"))


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("LEFUSION_CONFIG", "LEFUSION_RATE", "LEFUSION_MODE", "LEFUSION_CACHE"):
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
        trainer = make_trainer(nnUNetTrainerLeFusion_r000, phantom_dataset)
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
