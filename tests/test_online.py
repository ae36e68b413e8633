"""Online mode: settings, the producer's pool in process, and real nnUNetv2_train runs that synthesize while training
(copy-paste with 0 and 2 augmentation workers; LeFusion with a tiny sampler trained here, slow)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_lefusion.config import ENV_VARIABLES, load_settings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.cache import CASE_FILES, MANIFEST, Manifest
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.dataset import SyntheticMixDataset
from nnunet_lefusion.nnunet.online import synthesizer_options
from nnunet_lefusion.nnunet.trainer import nnUNetTrainerLeFusion
from nnunet_lefusion.synthesis.plan import SynthesisPlan
from tests.nnunet_helpers import latest_training_log, run_cli


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_online_settings_and_validation(clean_env, tmp_path):
    cfg = tmp_path / "lefusion.yaml"
    cfg.write_text("mode: online\nonline_cases_per_epoch: 3\npool_max: 5\nmix: {newmask: 1, normal: 1}\n")
    s = load_settings(cfg)
    assert (s.mode, s.online_cases_per_epoch, s.pool_max, s.method) == ("online", 3, 5, "copypaste")
    assert s.synthesis_plan().mix == {"newmask": 1.0, "normal": 1.0}
    assert synthesizer_options(s, "cuda:1").device == "cuda:1"
    clean_env.setenv("LEFUSION_POOL_MAX", "7")
    clean_env.setenv("LEFUSION_TIME_SHARE", "0.25")
    clean_env.setenv("LEFUSION_HISTOGRAM_MATCHING", "false")
    s = load_settings(cfg)
    assert (s.pool_max, s.online_time_share, s.histogram_matching) == (7, 0.25, False)
    for env, value, message in [("LEFUSION_POOL_MAX", "0", "pool_max"), ("LEFUSION_TIME_SHARE", "1", "time_share"),
                                ("LEFUSION_SAMPLING", "slow", "sampling"), ("LEFUSION_MIX", "bogus=1", "mix"),
                                ("LEFUSION_STRIDED_STEPS", "0", "strided_steps"),
                                ("LEFUSION_MODE", "offline", "mode"), ("LEFUSION_CASES_PER_EPOCH", "x", "valid int")]:
        clean_env.setenv(env, value)
        with pytest.raises(LeFusionError, match=message):
            load_settings(cfg)
        clean_env.delenv(env)
    clean_env.setenv("LEFUSION_METHOD", "lefusion")  # no checkpoint: the shipped sampler, resolved at start
    assert load_settings(cfg).checkpoint is None
    clean_env.delenv("LEFUSION_METHOD")
    cfg.write_text("mode: online\nonline_cases_per_epoch: 0\n")
    with pytest.raises(LeFusionError, match="both 0"):
        load_settings(cfg)
    cfg.write_text("pool_max: many\n")
    with pytest.raises(LeFusionError, match="pool_max must be a int"):
        load_settings(cfg)


def test_stream_of_kinds_follows_the_mix():
    plan = SynthesisPlan(mix={"retexture": 0.5, "normal": 0.25, "newmask": 0.25})
    made: dict[str, int] = {}
    order = []
    for _ in range(8):
        kind = plan.next_kind(made)
        made[kind] = made.get(kind, 0) + 1
        order.append(kind)
    assert made == {"retexture": 4, "normal": 2, "newmask": 2}
    assert order[:4].count("retexture") == 2


def make_trainer(dataset: str, configuration: str = "3d_fullres"):
    return get_trainer_from_args(dataset, configuration, 0, nnUNetTrainerLeFusion.__name__,
                                 device=torch.device("cpu"))


def test_producer_fills_a_bounded_pool_that_the_dataset_follows(phantom_dataset, clean_env, tmp_path):
    cache = tmp_path / "pool"
    clean_env.setenv("LEFUSION_MODE", "online")
    clean_env.setenv("LEFUSION_RATE", "1")
    clean_env.setenv("LEFUSION_CACHE", str(cache))
    clean_env.setenv("LEFUSION_POOL_MAX", "2")
    trainer = make_trainer(phantom_dataset)
    tr, val = trainer.get_tr_and_val_datasets()
    assert isinstance(tr, SyntheticMixDataset) and type(val) is nnUNetDatasetBlosc2 and tr.watch
    assert Manifest.load(cache).cases == {}, "an online run may start from an empty cache"
    assert all("lefusion" not in tr.load_case(i)[3] for i in tr.identifiers), "empty pool: every load is real"
    producer = trainer.lefusion_source
    cases = [c for pool in producer.pools.values() for c in pool]
    assert cases and all(isinstance(a, np.memmap) for c in cases for a in (c.image, c.seg)), \
        "the training cases are memory-mapped, not held in the process's memory"
    scratch = producer.scratch
    made = [producer.produce(epoch=0) for _ in range(3)]
    manifest = Manifest.load(cache)
    assert manifest.online_ids() == made[1:] and set(manifest.cases) == set(made[1:]), "the oldest was retired"
    assert not any((cache / f"{made[0]}{s}").exists() for s in CASE_FILES), "retired files are deleted"
    assert all((cache / f"{i}{s}").is_file() for i in made[1:] for s in CASE_FILES)
    assert manifest.runs[-1]["online"] and all(c["run"] == manifest.runs[-1]["id"] for c in manifest.cases.values())
    # The (watching) dataset sees the new cases without being rebuilt, in this process or a worker.
    np.random.seed(0)
    for _ in range(8):   # rate 1: every load is one of the pool's cases, whichever case nnU-Net asked for
        props = tr.load_case(tr.identifiers[0])[3]
        assert props["lefusion"]["source"] in {manifest.cases[i]["source"] for i in made[1:]}
        assert "online" in props["lefusion"]
    assert {i for ids in tr.variants.values() for i in ids} == set(made[1:])
    # A worker that still lists a retired case serves the real one instead of crashing.
    retired_source = made[0].split("__syn")[0]
    tr.variants = {retired_source: [made[0]]}
    key = tr._manifest_key
    assert "lefusion" not in tr.load_case(retired_source)[3]
    assert tr._manifest_key == key
    loads, synthetic = trainer.lefusion_counters.snapshot()
    assert loads == len(tr.identifiers) + 9 and synthetic == 8
    voxels = trainer.lefusion_counters.voxel_snapshot()
    assert sum(voxels["real"].values()) > 0 and sum(voxels["synthetic"].values()) > 0
    ids, lost = trainer.lefusion_counters.new_ids()
    assert len(ids) == 8 and set(ids) == set(made[1:]) and lost == 0
    for identifier in val.identifiers:
        assert "lefusion" not in val.load_case(identifier)[3]
    producer.close()
    assert not scratch.exists(), "the mapped cases are removed at the end"
    # A second start (resume) keeps the pool, adds its own run entry and deletes files no manifest lists.
    orphan = cache / "Case_P001__syn0099.pkl"
    orphan.write_bytes(b"left by a killed run")
    again = make_trainer(phantom_dataset)
    again.get_tr_and_val_datasets()
    assert not orphan.exists() and set(Manifest.load(cache).cases) == set(made[1:])
    assert len(Manifest.load(cache).runs) == 2 and again.lefusion_source.initial_ids == set(made[1:])
    again.lefusion_source.close()


SHORT = {"LEFUSION_EPOCHS": "2", "LEFUSION_VAL_ITERS": "1", "LEFUSION_ITERS": "8", "LEFUSION_MODE": "online",
         "LEFUSION_RATE": "1", "LEFUSION_CASES_PER_EPOCH": "3", "LEFUSION_POOL_MAX": "4"}


def train_online(dataset: str, configuration: str, env: dict, cache: Path) -> tuple[Path, dict]:
    env = {**SHORT, "LEFUSION_CACHE": str(cache), **env}
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    res = run_cli("nnUNetv2_train", "990", configuration, "0", "-tr", "nnUNetTrainerLeFusion_short", "-device", "cpu",
                  env={**clean, **env})
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    fold = Path(os.environ["nnUNet_results"], dataset, f"nnUNetTrainerLeFusion_short__nnUNetPlans__{configuration}",
                "fold_0")
    return fold, json.loads((fold / "lefusion_stats.json").read_text())


def check_online_run(fold: Path, stats: dict, cache: Path, dataset: str, configuration: str, pool_max: int,
                     initial: set[str]) -> None:
    epochs = stats["epochs"]
    assert [e["produced"] for e in epochs] == [3, 3]
    assert all(e["pool_online"] <= pool_max for e in epochs) and epochs[-1]["pool_online"] == pool_max
    new_loaded = set(stats["online"]["new_ids_loaded"])
    assert new_loaded and not new_loaded & initial, "cases made during training were loaded by the workers"
    assert all(e["loads"] > 0 for e in epochs) and epochs[-1]["new_loads"] > 0
    assert sum(epochs[-1]["lesion_voxels"]["synthetic"].values()) > 0
    manifest = Manifest.load(cache)
    assert len(manifest.online_ids()) == pool_max
    files = [p.name for p in cache.iterdir() if not p.name.startswith(".") and p.name != MANIFEST]
    assert len(files) == len(CASE_FILES) * len(manifest.cases), "only listed cases stay on disk"
    assert not any(p.name.startswith(".writer-") for p in cache.iterdir()), "the writer mark is removed at the end"
    log = latest_training_log(fold)
    assert "LeFusion online: 3 case(s) made this epoch" in log and "lesion voxels loaded" in log
    val = DatasetContext(dataset, configuration, 0).split[1]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert sorted(Path(c["prediction_file"]).name for c in summary["metric_per_case"]) == sorted(
        f"{v}.nii.gz" for v in val), "validation sees only the real validation cases"


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_online_copypaste_training(phantom_dataset, tmp_path, workers):
    cache = tmp_path / "cache"
    fold, stats = train_online(phantom_dataset, "2d", {"nnUNet_n_proc_DA": workers}, cache)
    check_online_run(fold, stats, cache, phantom_dataset, "2d", 4, set())


@pytest.mark.slow
def test_online_lefusion_training_from_an_existing_cache(phantom_dataset, tmp_path):
    sampler = tmp_path / "sampler"
    run_cli("nnUNetv2_lefusion_train_sampler", "-d", "990", "-f", "0", "--config", "tiny", "--roi", "2", "32", "32",
            "--steps", "2", "--batch-size", "1", "--checkpoint-every", "2", "--quiet", "-o", str(sampler))
    cache = tmp_path / "cache"
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "2d", "-n", "2", "--cache", str(cache))
    initial = set(Manifest.load(cache).cases)
    # One LeFusion case (2x32x32 ROI, 6 strided steps), made after the first step, then loaded (0 workers: no
    # prefetched batches from before it).
    fold, stats = train_online(phantom_dataset, "2d", {
        "nnUNet_n_proc_DA": "0", "LEFUSION_EPOCHS": "1", "LEFUSION_ITERS": "16", "LEFUSION_METHOD": "lefusion",
        "LEFUSION_CASES_PER_EPOCH": "1", "LEFUSION_POOL_MAX": "1", "LEFUSION_STRIDED_STEPS": "6",
        "LEFUSION_CHECKPOINT": str(sampler / "checkpoint_final.pt")}, cache)
    (epoch,) = stats["epochs"]
    assert (epoch["produced"], epoch["pool_online"], epoch["pool_total"]) == (1, 1, len(initial) + 1)
    manifest = Manifest.load(cache)
    assert initial < set(manifest.cases), "the cases of the existing cache are kept and used"
    (online_id,) = manifest.online_ids()
    info = manifest.cases[online_id]
    assert info["method"] == "lefusion" and info["kind"] == "retexture" and info["online"]["epoch"] == 0
    assert stats["online"]["new_ids_loaded"] == [online_id]
    assert manifest.runs[-1]["generators"][0]["role"] == "sampler", "the online sampler is recorded for leak checks"
