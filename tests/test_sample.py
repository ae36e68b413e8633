"""nnUNetv2_lefusion_sample, resynthesize() and LeFusionSynthesizer with a tiny sampler trained on phantom ROIs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.stats import spearmanr, wasserstein_distance

from nnunet_lefusion.cli.sample import main as sample_main
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.rule_based import RuleBasedMaskGenerator
from nnunet_lefusion.synthesis.base import RawCase, SynthesisSkipped
from nnunet_lefusion.synthesis.lefusion import LeFusionSynthesizer, LesionSampler, resynthesize
from nnunet_lefusion.training.loop import FINAL
from nnunet_lefusion.roi import covering_rois
from tests.nnunet_helpers import one_error_line
from tests.test_train_sampler import dataset, train_tiny  # noqa: F401  (shared fixtures)

# A very short fast-mode walk: 4 strided steps, no resampling -> 4 network evaluations per ROI.
QUICK = ["--strided-steps", "4", "--jumps", "1", "1"]
QUICK_KW = {"strided_steps": 4, "jumps": (1, 1)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampler")
    train_tiny(out, 2)
    return out / FINAL


def _case(dataset: Path, name: str) -> tuple[sitk.Image, sitk.Image]:
    return (sitk.ReadImage(str(dataset / "imagesTr" / f"{name}_0000.nii.gz")),
            sitk.ReadImage(str(dataset / "labelsTr" / f"{name}.nii.gz")))


def test_cli_rewrites_only_lesion_voxels(dataset, checkpoint, tmp_path):
    out = tmp_path / "syn.nii.gz"
    sample_main(["-i", str(dataset / "imagesTr" / "Case_P001_0000.nii.gz"),
                 "-l", str(dataset / "labelsTr" / "Case_P001.nii.gz"), "-o", str(out),
                 "--checkpoint", str(checkpoint), "--seed", "3", *QUICK])
    image, label = _case(dataset, "Case_P001")
    synthetic = sitk.ReadImage(str(out))
    assert synthetic.GetSize() == image.GetSize() and synthetic.GetPixelID() == image.GetPixelID()
    assert synthetic.GetSpacing() == image.GetSpacing() and synthetic.GetOrigin() == image.GetOrigin()
    assert synthetic.GetDirection() == image.GetDirection()
    before, after = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(synthetic)
    lesion = np.isin(sitk.GetArrayFromImage(label), (3, 4))
    assert np.array_equal(before[~lesion], after[~lesion])
    assert np.count_nonzero(before[lesion] != after[lesion]) > 20  # the lesion voxels inside the small test ROI
    assert before.min() <= after.min() and after.max() <= before.max()


def test_resynthesize_api_is_seeded_and_keeps_dtype(dataset, checkpoint):
    image, label = (sitk.GetArrayFromImage(v) for v in _case(dataset, "Case_P002"))
    image = image.astype(np.float32) * 0.5  # any float image, any range
    sampler = LesionSampler.load(checkpoint)
    a = resynthesize(image, label, sampler, seed=1, **QUICK_KW)
    b = resynthesize(image, label, sampler, seed=1, **QUICK_KW)
    c = resynthesize(image, label, sampler, seed=2, histogram=0, **QUICK_KW)
    lesion = np.isin(label, (3, 4))
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a[~lesion], image[~lesion]) and np.array_equal(c[~lesion], image[~lesion])
    assert image.min() <= a.min() and a.max() <= image.max()


def test_histogram_matching_takes_the_condition_and_keeps_the_network_pattern(dataset, checkpoint):
    """The lesion's own histogram as condition: matched lesions (the default for a network without a level offset)
    get the real intensity distribution back (up to bin width); the untrained network's raw values do not. The voxel
    order within each class is the network's."""
    image, label = (sitk.GetArrayFromImage(v) for v in _case(dataset, "Case_P001"))
    sampler = LesionSampler.load(checkpoint)
    raw = resynthesize(image, label, sampler, seed=1, histogram="case", histogram_matching=False, **QUICK_KW)
    matched = resynthesize(image, label, sampler, seed=1, histogram="case", **QUICK_KW)
    outside = ~np.isin(label, (3, 4))
    assert np.array_equal(raw[outside], image[outside]) and np.array_equal(matched[outside], image[outside])
    tested = 0
    for cls in (3, 4):   # every lesion voxel, over all the windows that cover the lesions
        real, before, after = (v[label == cls].astype(np.float64) for v in (image, raw, matched))
        if real.size < 20:
            continue
        tested += 1
        assert wasserstein_distance(real, after) < 0.1 * real.std() < wasserstein_distance(real, before)
    assert tested
    earlier = np.zeros(label.shape, dtype=bool)   # each window is matched on its own: order kept within it
    for spec in covering_rois(image, label, (2, 3, 4), (3, 4), sampler.roi_size):
        window = np.zeros(label.shape, dtype=bool)
        window[spec.overlap()[0]] = True
        made_here = window & ~earlier & np.isin(label, (3, 4))
        earlier |= made_here
        for cls in (3, 4):
            if ((label == cls) & made_here).sum() >= 20:
                assert spearmanr(raw[(label == cls) & made_here], matched[(label == cls) & made_here]).statistic > 0.99


def _raw_case(dataset: Path, name: str, slices: int | None = None) -> RawCase:
    """A raw phantom case; with ``slices``, only that many consecutive slices, where the lesions (else the
    heart) are largest: thin enough for the 2-slice test window, wider than it in-plane."""
    image, label = (sitk.GetArrayFromImage(v) for v in _case(dataset, name))
    if slices:
        weight = np.where(np.isin(label, (3, 4)).any(), np.isin(label, (3, 4)), label > 0).sum(axis=(1, 2))
        first = int(np.argmax(np.convolve(weight, np.ones(slices), "valid")))
        image, label = image[first:first + slices], label[first:first + slices]
    spacing = sitk.ReadImage(str(dataset / "labelsTr" / f"{name}.nii.gz")).GetSpacing()[::-1]
    return RawCase(name, image[None].astype(np.float32), label[None].astype(np.float32), {"spacing": list(spacing)})


def _retextured_share(before: RawCase, after: RawCase, labels: LesionLabels) -> float:
    """The share of the synthetic case's lesion voxels whose intensity the sampler changed."""
    lesion = np.isin(after.seg[0], labels.lesions)
    return float((after.image[0][lesion] != before.image[0][lesion]).mean())


def test_synthesizer_retextures_real_and_generated_lesions(dataset, checkpoint):
    labels = LesionLabels.emidec()
    sick, normal = _raw_case(dataset, "Case_P003", slices=2), _raw_case(dataset, "Case_N001", slices=2)
    assert min((normal.seg[0] > 0).any(axis=(0, 1)).sum(), (normal.seg[0] > 0).any(axis=(0, 2)).sum()) > 32, \
        "the organ must be wider than the 32-voxel test window"
    rng = np.random.default_rng(0)
    plain = LeFusionSynthesizer(checkpoint, labels, **QUICK_KW)
    assert plain.kinds == ("retexture",)
    with pytest.raises(SynthesisSkipped):
        plain.propose(normal, "retexture", rng)
    with pytest.raises(LeFusionError, match="mask generator"):
        plain.propose(normal, "normal", rng)
    generated = LeFusionSynthesizer(LesionSampler.load(checkpoint), labels, mask_generator=RuleBasedMaskGenerator(),
                                    **QUICK_KW)
    proposals = [generated.propose(sick, "retexture", rng), generated.propose(normal, "normal", rng),
                 generated.propose(sick, "newmask", rng)]
    real, new, added = generated.render_many(proposals, rng)
    assert [s.provenance["kind"] for s in (real, new, added)] == ["retexture", "normal", "newmask"]
    assert np.array_equal(real.case.seg, sick.seg)
    lesion = np.isin(sick.seg[0], labels.lesions)
    assert np.array_equal(real.case.image[0][~lesion], sick.image[0][~lesion])
    assert not np.array_equal(real.case.image[0][lesion], sick.image[0][lesion])
    new_lesion = np.isin(new.case.seg[0], labels.lesions)
    assert new_lesion.any() and not np.isin(normal.seg, labels.lesions).any()
    assert np.array_equal(new.case.image[0][~new_lesion], normal.image[0][~new_lesion])
    assert np.array_equal(new.case.seg[0][~new_lesion], normal.seg[0][~new_lesion])
    # new lesions are added to a pathological case: its own lesion voxels stay lesion voxels
    grown = np.isin(added.case.seg[0], labels.lesions)
    assert (grown & lesion).sum() == lesion.sum() and grown.sum() > lesion.sum()
    assert np.array_equal(added.case.image[0][~grown], sick.image[0][~grown])
    # every lesion voxel got a new texture: each window was placed to hold all of its case's lesions
    for before, after in ((sick, real), (normal, new), (sick, added)):
        assert _retextured_share(before, after.case, labels) > 0.97


def test_new_lesions_hold_the_classes_a_target_share_asks_for(dataset, checkpoint):
    normal = _raw_case(dataset, "Case_N001", slices=2)
    generated = LeFusionSynthesizer(checkpoint, LesionLabels.emidec(), mask_generator=RuleBasedMaskGenerator(),
                                    **QUICK_KW)
    drawn = [generated.propose(normal, "normal", np.random.default_rng(i)).seg for i in range(6)]
    asked = [generated.propose(normal, "normal", np.random.default_rng(i), (4,)).seg for i in range(6)]
    assert not all((seg == 4).any() for seg in drawn), "the generator alone draws no-reflow only sometimes"
    assert all((seg == 4).any() and (seg == 3).any() for seg in asked)
    candidates = generated.propose_many(normal, "normal", np.random.default_rng(0), 4, (4,))
    assert len(candidates) == 4 and all((p.seg == 4).any() and (p.seg == 3).any() for p in candidates)
    assert len({p.seg.tobytes() for p in candidates}) > 1, "candidates are different draws"


def test_lesions_wider_than_the_window_are_covered_by_several_windows(dataset, checkpoint):
    """A lesion through more slices than the 2-slice window: windows one after the other re-texture all of it."""
    sick = _raw_case(dataset, "Case_P003")
    assert np.isin(sick.seg[0], (3, 4)).any(axis=(1, 2)).sum() > 2
    synthesizer = LeFusionSynthesizer(checkpoint, LesionLabels.emidec(), **QUICK_KW)
    rng = np.random.default_rng(0)
    made = synthesizer.render(synthesizer.propose(sick, "retexture", rng), rng).case
    lesion = np.isin(sick.seg[0], (3, 4))
    assert np.array_equal(made.image[0][~lesion], sick.image[0][~lesion])
    assert _retextured_share(sick, made, LesionLabels.emidec()) > 0.97


def test_bad_input_is_one_error_line(dataset, checkpoint, tmp_path, capsys):
    image = str(dataset / "imagesTr" / "Case_P001_0000.nii.gz")
    label = str(dataset / "labelsTr" / "Case_P001.nii.gz")
    out = str(tmp_path / "o.nii.gz")
    not_a_checkpoint = checkpoint.parent / "model_config.yaml"

    def error(argv: list[str]) -> str:
        return one_error_line(capsys, sample_main, argv)

    assert "checkpoint" in error(["-i", image, "-l", label, "-o", out, "--checkpoint", str(not_a_checkpoint)])
    normal = str(dataset / "labelsTr" / "Case_N001.nii.gz")
    other_image = str(dataset / "imagesTr" / "Case_N001_0000.nii.gz")
    assert "grid" in error(["-i", image, "-l", normal, "-o", out, "--checkpoint", str(checkpoint)])
    assert "no voxel of the lesion labels" in error(["-i", other_image, "-l", normal, "-o", out,
                                                     "--checkpoint", str(checkpoint)])
    assert "cluster" in error(["-i", image, "-l", label, "-o", out, "--checkpoint", str(checkpoint),
                               "--cluster", "9", *QUICK])
    assert "does not exist" in error(["-i", image, "-l", label, "-o", str(tmp_path / "no" / "o.nii.gz"),
                                      "--checkpoint", str(checkpoint)])


def test_official_checkpoint_without_metadata(dataset, checkpoint, tmp_path):
    """A file in the bare official layout (no lefusion_meta) is used with the Emidec settings."""
    payload = torch.load(checkpoint, weights_only=True)
    official = {key: payload[key] for key in ("step", "model", "ema", "scaler")}
    torch.save(official, tmp_path / "official.pt")
    sampler = LesionSampler.load(tmp_path / "official.pt", weights="model")
    assert sampler.in_plane_transposed and sampler.clusters is None and sampler.roi_size == (10, 72, 72)
    image, label = (sitk.GetArrayFromImage(v) for v in _case(dataset, "Case_P001"))
    out = resynthesize(image, label, sampler, histogram="case", **QUICK_KW)
    lesion = np.isin(label, (3, 4))
    assert np.array_equal(out[~lesion], image[~lesion]) and not np.array_equal(out[lesion], image[lesion])
    with pytest.raises(LeFusionError, match="no histogram clusters"):
        resynthesize(image, label, sampler, histogram="random", **QUICK_KW)
