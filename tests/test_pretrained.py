"""The shipped weights: taken by default where the labels fit, refused in one line where they do not; the shipped
sampler re-textures a fresh phantom case and keeps every other voxel bit-identical."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.model.checkpoint import read_meta
from nnunet_lefusion.nnunet.generators import SynthesizerOptions, with_shipped_generators
from nnunet_lefusion.phantom import generate_case
from nnunet_lefusion.pretrained import SHIPPED
from nnunet_lefusion.synthesis.lefusion import LesionSampler, sampler_config
from nnunet_lefusion.synthesis.plan import SynthesisPlan
from tests.nnunet_helpers import run_cli

EMIDEC = LesionLabels.emidec()
NEW_MASKS = SynthesisPlan.parse("retexture=0.5,normal=0.5", None)


def test_shipped_generators_fill_what_is_missing_where_the_labels_fit():
    filled = with_shipped_generators("lefusion", SynthesizerOptions(), EMIDEC, None)
    assert filled.checkpoint == str(SHIPPED["sampler"]) and filled.mask_generator is None  # re-texturing only
    filled = with_shipped_generators("lefusion", SynthesizerOptions(), EMIDEC, NEW_MASKS)
    assert filled.mask_generator == str(SHIPPED["mask generator"])
    other = LesionLabels(lesions=(1,), organ=(2,))
    given = with_shipped_generators("lefusion", SynthesizerOptions("mine.pt", mask_generator="rule"), other,
                                    NEW_MASKS)
    assert (given.checkpoint, given.mask_generator) == ("mine.pt", "rule")
    assert with_shipped_generators("copypaste", SynthesizerOptions(), other, None) == SynthesizerOptions()
    with pytest.raises(LeFusionError, match="no --checkpoint given, and the shipped sampler knows lesion labels"):
        with_shipped_generators("lefusion", SynthesizerOptions(), other, None)
    with pytest.raises(LeFusionError, match="no --mask-generator given"):
        with_shipped_generators("lefusion", SynthesizerOptions("mine.pt"), other, NEW_MASKS)


def test_shipped_sampler_retextures_a_fresh_case(one_thread):
    """Small enough to ship, Emidec labels, histogram clusters and a guidance scale; a fresh pathological phantom
    case (a seed no model was trained on) gets new lesion voxels and an unchanged background, as sampled and
    histogram-matched; being a level-offset network, its default output is the one as sampled."""
    path = SHIPPED["sampler"]
    assert path.stat().st_size <= 25 * 2 ** 20
    meta = read_meta(path)
    assert meta.extras["kind"] == "lefusion_sampler" and meta.training_data["cases"]
    sampler = LesionSampler.load(path)
    assert (sampler.labels.lesions, sampler.labels.organ) == (EMIDEC.lesions, EMIDEC.organ)
    assert sampler.clusters is not None and sampler.guidance >= 1.0
    assert len(sampler.clusters.organ_levels) == len(sampler.clusters.centers)   # conditions follow the organ
    case = generate_case(np.random.default_rng([31337, 0]), True, fov="heart")
    lesion = np.isin(case.label, EMIDEC.lesions)
    pairs = sampler.resynthesize_pairs([case.image], [case.label], np.random.default_rng(0),
                                       sampler_config("fast", strided_steps=6))
    for out in pairs[0]:
        assert out.dtype == case.image.dtype and out.shape == case.image.shape
        assert np.array_equal(out[~lesion], case.image[~lesion])
        assert np.mean(out[lesion] != case.image[lesion]) > 0.9
        assert case.image.min() <= out[lesion].min() and out[lesion].max() <= case.image.max()
    default = sampler.resynthesize_many([case.image], [case.label], np.random.default_rng(0),
                                        sampler_config("fast", strided_steps=6))[0]
    assert sampler.level_offset and np.array_equal(default, pairs[0][0])


@pytest.mark.slow
def test_synthesize_without_checkpoint_uses_the_shipped_weights(nnunet_dirs, tmp_path):
    """nnUNetv2_lefusion_synthesize --method lefusion with neither --checkpoint nor --mask-generator, on an
    Emidec-labelled dataset no shipped model saw: the shipped sampler and mask generator make the cases, the
    manifest records them, and the preview pictures are written (6 strided steps instead of the fast mode's 45:
    the test is about which weights are used, not about their textures)."""
    run_cli("nnUNetv2_lefusion_phantom", "-d", "989", "-n", "6", "--fov", "heart", "--seed", "5")
    run_cli("nnUNetv2_plan_and_preprocess", "-d", "989", "-c", "3d_fullres", "-np", "2", "-npfp", "2")
    cache = tmp_path / "cache"
    done = run_cli("nnUNetv2_lefusion_synthesize", "-d", "989", "-c", "3d_fullres", "-f", "0", "--method",
                   "lefusion", "--mix", "retexture=0.5,normal=0.5", "-n", "2", "--cache", str(cache), "--preview",
                   str(tmp_path / "preview"), "-device", "cpu", "--strided-steps", "6")
    assert "2 preview pictures" in done.stdout and len(list((tmp_path / "preview").glob("*.png"))) == 2
    manifest = json.loads((cache / "manifest.json").read_text())
    used = {Path(g["path"]) for run in manifest["runs"] for g in run["generators"]}
    assert used == {SHIPPED["sampler"], SHIPPED["mask generator"]}
    kinds = sorted(case["kind"] for case in manifest["cases"].values())
    assert kinds == ["normal", "retexture"] and manifest["runs"][0]["request"]["strided_steps"] == 6
    fast = sampler_config("fast").evaluations(300)
    assert {case["evaluations"] for case in manifest["cases"].values()} == {
        sampler_config("fast", strided_steps=6).evaluations(300)} and fast == 128
