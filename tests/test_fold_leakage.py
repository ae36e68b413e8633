"""No fold leakage: generators train on one nnU-Net fold, record the cases they saw, and a generator (or a cache made
with one) that saw a validation case of the fold is refused. Real commands, tiny real models, Dataset990."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model.checkpoint import META_KEY, read_meta
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.provenance import check_no_leak, label_hash, nnunet_split
from nnunet_lefusion.nnunet.generators import SynthesizerOptions, generator_records
from nnunet_lefusion.nnunet.trainer import nnUNetTrainerLeFusion
from tests.nnunet_helpers import error_lines, run_cli

TINY_MASKS = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 1, "attn_dim_head": 8, "linear_attn": [False, True],
              "temporal_attn": [False, True], "resnet_groups": 4}
SHIPPED_MASKS = Path(__file__).resolve().parents[1] / "pretrained" / "lesion_masks_phantom.pt"


def train_sampler(out: Path, fold: str, steps: int = 2, *extra: str, check: bool = True):
    return run_cli("nnUNetv2_lefusion_train_sampler", "-d", "990", "-f", fold, "--config", "tiny", "--roi", "2", "32",
                   "32", "--steps", str(steps), "--batch-size", "1", "--checkpoint-every", "1", "--quiet",
                   "-o", str(out), *extra, check=check)


@pytest.fixture(scope="module")
def sampler_fold1(phantom_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampler_f1")
    train_sampler(out, "1")
    return out / "checkpoint_final.pt"


def _do_split(identifiers: list[str], fold, folder: Path) -> tuple[list, list]:
    """nnU-Net's own ``nnUNetTrainer.do_split`` on a dataset of ``identifiers`` preprocessed in ``folder``."""
    class Listed:
        def __init__(self, *args, **kwargs) -> None:
            self.identifiers = list(identifiers)

        @staticmethod
        def get_identifiers(_: str) -> list[str]:
            return sorted(identifiers)

    trainer = SimpleNamespace(dataset_class=Listed, fold=fold, preprocessed_dataset_folder=str(folder),
                              preprocessed_dataset_folder_base=str(folder), folder_with_segs_from_previous_stage=None,
                              print_to_log_file=lambda *a, **k: None)
    return nnUNetTrainer.do_split(trainer)


def test_the_split_is_nnunets_own(tmp_path):
    """The split every command uses is the one ``nnUNetv2_train`` uses: the 5-fold split it would write, a custom
    ``splits_final.json``, the seeded 80:20 split of a fold beyond the file, and ``all``."""
    ids = [f"case_{i:02d}" for i in range(23, 0, -1)]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    theirs.mkdir()   # nnU-Net's preprocessing made it
    for fold in (0, 3, 4, "all"):
        assert nnunet_split(ids, fold, ours) == tuple(map(list, _do_split(ids, fold, theirs)))
    # nnU-Net's dataset classes may list numpy strings; a checkpoint's record must hold plain ones (weights_only load)
    assert {type(k) for part in nnunet_split(list(np.array(ids)), "all", ours) for k in part} == {str}
    assert json.loads((ours / "splits_final.json").read_text()) == json.loads((theirs / "splits_final.json").read_text())
    custom = [{"train": ids[:20], "val": ids[20:]}, {"train": ids[3:], "val": ids[:3]}]
    for folder in (ours, theirs):
        (folder / "splits_final.json").write_text(json.dumps(custom))
    for fold in (1, 6):   # in the file, and beyond it (nnU-Net's seeded 80:20 split)
        assert nnunet_split(ids, fold, ours) == tuple(map(list, _do_split(ids, fold, theirs)))
    with pytest.raises(LeFusionError, match="only 4 training case"):
        nnunet_split(ids[:4], 0, tmp_path / "small")


@pytest.fixture(scope="module")
def masks_fold1(phantom_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("masks_f1")
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_MASKS))
    run_cli("nnUNetv2_lefusion_train_masks", "-d", "990", "-f", "1", "-o", str(out / "run"), "--config", str(config),
            "--window", "10", "64", "64", "--pool", "4", "--batch-size", "1", "--steps", "1", "--device", "cpu")
    return out / "run" / "checkpoint_final.pt"


def test_checkpoints_record_the_fold_cases_and_their_labels(phantom_dataset, sampler_fold1, masks_fold1):
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 1)
    train, val = ctx.split  # from the splits_final.json that nnU-Net (or the first command) wrote
    for checkpoint in (sampler_fold1, masks_fold1):
        record = read_meta(checkpoint).training_data
        assert record["dataset"] == phantom_dataset and record["fold"] == "1"
        assert sorted(record["cases"]) == sorted(train) and not set(record["cases"]) & set(val)
        assert all(record["cases"][k] == label_hash(ctx.raw_cases[k]["label"]) for k in train)


@pytest.fixture(scope="module")
def sampler_fold0(phantom_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampler_f0")
    train_sampler(out, "0")
    return out / "checkpoint_final.pt"


@pytest.mark.parametrize("leaking", ["sampler", "mask generator"])
def test_synthesize_refuses_a_generator_that_saw_validation_cases(request, phantom_dataset, tmp_path, leaking):
    sampler = request.getfixturevalue("sampler_fold1" if leaking == "sampler" else "sampler_fold0")
    masks = "rule" if leaking == "sampler" else str(request.getfixturevalue("masks_fold1"))
    cache = tmp_path / "cache"
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-f", "0", "--method", "lefusion", "--checkpoint",
                  str(sampler), "--mask-generator", masks, "--mix", "retexture=0.5,newmask=0.5", "-n", "1",
                  "--cache", str(cache), check=False)
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert f"the {leaking} " in lines[0] and "validation case" in lines[0] and "-f 0" in lines[0]
    assert not cache.exists(), "a refused run writes nothing"


def test_generators_of_another_dataset_or_unrecorded_pass(phantom_dataset, sampler_fold1):
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    records = generator_records("lefusion", SynthesizerOptions(str(sampler_fold1), mask_generator=str(SHIPPED_MASKS)))
    sampler, shipped = records
    assert shipped["training_data"] is None  # the shipped weights: trained on a separate phantom, unrecorded
    held_out = ctx.held_out_hashes()
    assert set(held_out) & set(sampler["training_data"]["cases"]), "fold 1 training cases are fold 0 validation cases"
    # the same identifiers with other label contents: another dataset reusing the names, no leak
    sampler["training_data"]["cases"] = {k: "0" * 16 for k in sampler["training_data"]["cases"]}
    check_no_leak(records, held_out, 0, "test")


def test_resume_keeps_the_fold(phantom_dataset, tmp_path):
    out = tmp_path / "run"
    train_sampler(out, "0", 1)
    res = train_sampler(out, "1", 2, "--resume", check=False)
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1 and "fold 0" in lines[0] and "fold 1" in lines[0], res.stderr
    # a checkpoint written before checkpoints recorded their cases still resumes
    latest = out / "checkpoint_latest.pt"
    payload = torch.load(latest, weights_only=True)
    del payload[META_KEY]["training_data"]
    torch.save(payload, latest)
    train_sampler(out, "0", 2, "--resume")
    assert read_meta(out / "checkpoint_final.pt").training_data["fold"] == "0"


def test_trainer_refuses_a_cache_made_with_a_leaking_generator(phantom_dataset, sampler_fold1, tmp_path,
                                                               monkeypatch):
    cache = tmp_path / "cache"
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-f", "0", "-n", "1", "--cache", str(cache))
    manifest = json.loads((cache / "manifest.json").read_text())
    # what synthesize would have recorded had it accepted the fold-1 sampler
    manifest["runs"][0]["generators"] = generator_records("lefusion", SynthesizerOptions(str(sampler_fold1)))
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for var in ("LEFUSION_CONFIG", "LEFUSION_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LEFUSION_RATE", "0.5")
    monkeypatch.setenv("LEFUSION_CACHE", str(cache))
    with pytest.raises(LeFusionError, match="validation case"):  # in the constructor, before nnU-Net's own work
        get_trainer_from_args(phantom_dataset, "3d_fullres", 0, nnUNetTrainerLeFusion.__name__,
                              device=torch.device("cpu"))


def test_cascade_configuration_is_refused(phantom_dataset, nnunet_dirs):
    base = Path(nnunet_dirs["nnUNet_preprocessed"]) / phantom_dataset
    plans = json.loads((base / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlansCascadeTest"
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    (base / "nnUNetPlansCascadeTest.json").write_text(json.dumps(plans))
    try:
        res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_cascade_fullres", "-p",
                      "nnUNetPlansCascadeTest", "-n", "1", check=False)
    finally:
        (base / "nnUNetPlansCascadeTest.json").unlink()
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1 and "cascade" in lines[0], res.stderr
