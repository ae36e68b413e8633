"""End to end with the LeFusion method: train a tiny sampler, then fill an nnU-Net cache with re-textured (P')
cases and lesions on normal cases (N') drawn by the rule-based mask generator."""
from __future__ import annotations

import os
import pickle

import blosc2
import numpy as np
import pytest

from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.context import DatasetContext
from tests.nnunet_helpers import error_lines, run_cli

pytestmark = pytest.mark.slow


def test_lefusion_cache_with_retextured_and_normal_cases(phantom_dataset, tmp_path):
    out = tmp_path / "sampler"
    run_cli("nnUNetv2_lefusion_train_sampler", "-d", "990", "-f", "0", "--config", "tiny", "--roi", "6", "40", "40",
            "--steps", "3", "--batch-size", "2", "--checkpoint-every", "3", "--quiet", "-o", str(out))
    checkpoint = out / "checkpoint_final.pt"
    assert checkpoint.is_file()
    cache = tmp_path / "cache"
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "--method", "lefusion", "--checkpoint",
                  str(checkpoint), "-n", "2", "--mix", "retexture=0.5,normal=0.5", "--mask-generator", "rule",
                  "--cache", str(cache))
    manifest = Manifest.load(cache)
    assert sorted(c["kind"] for c in manifest.cases.values()) == ["normal", "retexture"]
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    for syn_id, info in manifest.cases.items():
        assert info["method"] == "lefusion" and info["evaluations"] <= 150
        seg = blosc2.open(str(cache / f"{syn_id}_seg.b2nd"), mode="r")[:]
        real_seg = blosc2.open(str(ctx.data_folder / f"{info['source']}_seg.b2nd"), mode="r")[:]
        assert np.isin(seg, (3, 4)).any()
        if info["kind"] == "normal":
            assert not np.isin(real_seg, (3, 4)).any(), "an N' case starts from a normal case"
        else:
            assert np.array_equal(seg, real_seg), "P' keeps the real lesion masks"
        props = pickle.loads((cache / f"{syn_id}.pkl").read_bytes())
        assert len(props["class_locations"][3]) > 0
    assert "lesion voxels, synthetic" in res.stdout


def test_lefusion_method_needs_a_valid_checkpoint(phantom_dataset, tmp_path):
    # no --checkpoint: the shipped sampler, which was trained on phantom cases of seed 0, this dataset's
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "--method", "lefusion", "-n", "1", "--cache",
                  str(tmp_path / "c"), check=False)
    assert res.returncode == 2 and "lefusion_sampler_phantom.pt was trained on validation case" in error_lines(res)[0]
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(os.urandom(64))
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "--method", "lefusion", "-n", "1",
                  "--checkpoint", str(bogus), "--cache", str(tmp_path / "c"), check=False)
    assert res.returncode == 2 and len(error_lines(res)) == 1
    assert not (tmp_path / "c").exists(), "a refused run writes nothing"
