"""Copy-paste on phantom hearts: what a pasted lesion may overwrite, where its slices land, and how it nests."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import inner_lesion_exposure
from nnunet_lefusion.masks.geometry import IN_PLANE
from nnunet_lefusion.phantom import generate_case
from nnunet_lefusion.synthesis.base import RawCase
from nnunet_lefusion.synthesis.copypaste import CopyPasteSynthesizer

LABELS = LesionLabels.emidec()


@pytest.fixture(scope="module")
def hearts() -> list[RawCase]:
    """Phantom hearts, each with its own slice spacing (10.1-12.7 mm): four with infarct and no-reflow, two with
    infarct only, two normal."""
    seeds = {"P": (1, 3, 5, 7, 0, 2), "N": (10, 11)}
    cases = []
    for kind, numbers in seeds.items():
        for seed in numbers:
            case = generate_case(np.random.default_rng(seed), kind == "P", "heart")
            cases.append(RawCase(f"Case_{kind}{seed:03d}", case.image[None], case.label[None].astype(np.float32),
                                 {"spacing": list(case.spacing)}))
    assert sum(bool((c.seg == 4).any()) for c in cases) == 4
    assert len({c.spacing[0] for c in cases}) == len(cases)
    return cases


@pytest.fixture(scope="module")
def pasted(hearts) -> list[tuple[RawCase, RawCase]]:
    """(target, synthetic case) pairs: every heart a target four times, each asking for no-reflow."""
    synthesizer = CopyPasteSynthesizer(hearts, LABELS)
    rng = np.random.default_rng(0)
    pairs = []
    for target in hearts:
        kind = "newmask" if np.isin(target.seg, LABELS.lesions).any() else "normal"
        for proposal in synthesizer.propose_many(target, kind, rng, 4, want_classes=(4,)):
            pairs.append((target, synthesizer.render_many([proposal], rng)[0].case))
    return pairs


def test_pasted_lesions_never_overwrite_a_lesion_of_the_target(pasted):
    targets_with_no_reflow = 0
    for target, out in pasted:
        lesion = np.isin(target.seg, LABELS.lesions)
        targets_with_no_reflow += bool((target.seg == 4).any())
        assert np.array_equal(out.seg[lesion], target.seg[lesion]), "an existing lesion voxel changed class"
        assert np.array_equal(out.image[:, lesion[0]], target.image[:, lesion[0]])
        assert np.isin(out.seg, LABELS.lesions).sum() > lesion.sum(), "the paste added no lesion"
    assert targets_with_no_reflow == 16


def test_pasted_no_reflow_lies_inside_infarct_within_the_organ_as_on_real_cases(hearts, pasted):
    """The review's measure: the share of no-reflow's in-plane rim that is healthy organ; on real (here phantom)
    cases it is 0 because infarct encloses no-reflow up to the cavity and the organ's outer border."""
    real = [e for e in (inner_lesion_exposure(c.seg[0], LABELS) for c in hearts) if e is not None]
    synthetic = [inner_lesion_exposure(out.seg[0], LABELS) for _, out in pasted]
    assert len(real) == 4 and None not in synthetic, "every synthetic case was asked to hold no-reflow"
    assert np.median(synthetic) <= np.median(real) and max(synthetic) <= max(real)
    for target, out in pasted:
        seg = out.seg[0]
        new_no_reflow = (seg == 4) & (target.seg[0] != 4)
        assert np.all(np.isin(target.seg[0][new_no_reflow], LABELS.host)), "no-reflow outside the organ"
        healthy = np.isin(seg, LABELS.organ)
        assert not (new_no_reflow & ndimage.binary_dilation(healthy, structure=IN_PLANE)).any()


def test_no_reflow_that_would_touch_healthy_organ_becomes_infarct_with_infarct_intensities():
    """A donor's no-reflow (intensity 50) touches its organ's border inside an infarct (300); pasted into a larger
    organ, that border is healthy organ: the no-reflow row along it becomes infarct, image included."""
    seg = np.zeros((1, 1, 40, 40), np.float32)
    seg[0, 0, 10:30, 10:30] = 2
    seg[0, 0, 10:18, 16:24] = 3
    seg[0, 0, 10:13, 18:22] = 4
    image = np.select([seg == 4, seg == 3, seg == 2], [50.0, 300.0, 100.0]).astype(np.float32)
    donor = RawCase("Case_donor", image, seg, {"spacing": [10.0, 1.0, 1.0]})
    seg = np.zeros((1, 1, 40, 40), np.float32)
    seg[0, 0, 4:36, 4:36] = 2
    image = np.where(seg == 2, 100.0, 0.0).astype(np.float32)
    image[0, 0, 35, 4:36] = 50.0  # the same intensity range as the donor's organ, far from the lesion
    image[0, 0, 34, 4:36] = 300.0
    target = RawCase("Case_target", image, seg, {"spacing": [10.0, 1.0, 1.0]})
    synthesizer = CopyPasteSynthesizer([donor], LABELS, max_rotation_deg=0)
    out = synthesizer.propose(target, "normal", np.random.default_rng(0)).rendered
    assert inner_lesion_exposure(out.seg[0], LABELS) == 0.0
    assert (out.seg[0, 0, 10, 18:22] == 3).all() and (out.seg[0, 0, 11:13, 18:22] == 4).all()
    assert np.allclose(out.image[0, 0][out.seg[0, 0] == 3], 300.0)
    assert np.allclose(out.image[0, 0][out.seg[0, 0] == 4], 50.0)


def _stack(slices: int, slice_spacing: float, lesion_slices: range = range(0)) -> RawCase:
    """A column of square organ slices (label 2, 20 x 20 voxels of 1 mm in a 40 x 40 grid) at ``slice_spacing``,
    with an 8 x 8 infarct (label 3) in its middle on ``lesion_slices``."""
    seg = np.zeros((1, slices, 40, 40), np.float32)
    seg[0, :, 10:30, 10:30] = 2
    seg[0, list(lesion_slices), 16:24, 16:24] = 3
    image = np.where(seg == 3, 300.0, np.where(seg > 0, 100.0, 0.0)).astype(np.float32)
    return RawCase(f"Case_{slices}_{slice_spacing}", image, seg, {"spacing": [slice_spacing, 1.0, 1.0]})


@pytest.mark.parametrize("donor, target, pasted_slices", [
    (_stack(9, 5.0, range(2, 6)), _stack(5, 10.0), [1, 2]),      # 20 mm of thin slices onto 10 mm slices
    (_stack(5, 10.0, range(1, 3)), _stack(9, 5.0), [1, 2, 3, 4]),  # and back
])
def test_slices_are_mapped_by_their_spacing(donor, target, pasted_slices):
    """A lesion 20 mm long, 10 to 0 mm before the organ centre, keeps its length and place in a target of other
    slice spacing; its kept fraction counts it whole."""
    synthesizer = CopyPasteSynthesizer([donor], LesionLabels((3, 4), (2,), None), max_rotation_deg=0)
    out = synthesizer.render_many([synthesizer.propose(target, "normal", np.random.default_rng(0))],
                                  np.random.default_rng(0))[0]
    assert np.flatnonzero((out.case.seg[0] == 3).any(axis=(1, 2))).tolist() == pasted_slices
    assert out.provenance["kept_fraction"] == pytest.approx(1.0)
