"""Mask measurements on hand-built lesions of known size, depth and position."""
import numpy as np
import pytest

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.masks import (aligned_lesion_voxels, host_mask, ks_statistic, lesion_slice_count,
                                   lesion_volume_fraction, nearest_iou, transmurality, voxel_iou)
from tests.mask_fixtures import EMIDEC, MI, MVO, phantom_cases, ring_case

RING = ring_case(apex=False)
QUARTER = RING.with_lesion(MI, (0, 90))


def test_volume_fraction_of_a_quarter_ring_and_of_its_core():
    assert lesion_volume_fraction(QUARTER, EMIDEC) == pytest.approx(0.25, abs=0.02)
    with_core = RING.with_lesion(MVO, (30, 60), (0.0, 0.5), base=QUARTER)
    assert lesion_volume_fraction(with_core, EMIDEC) == lesion_volume_fraction(QUARTER, EMIDEC)
    core = (with_core == MVO).sum() / host_mask(with_core, EMIDEC).sum()
    assert lesion_volume_fraction(with_core, EMIDEC, lesion=MVO) == pytest.approx(core)
    assert lesion_volume_fraction(RING.label_map, EMIDEC) == 0.0
    with pytest.raises(LeFusionError):
        lesion_volume_fraction(np.zeros((2, 5, 5), dtype=np.uint8), EMIDEC)


def test_transmurality_follows_the_depth_the_lesion_reaches():
    full_ring = RING.with_lesion(MI, (0, 360))
    assert transmurality(full_ring, EMIDEC) == pytest.approx(1.0, abs=0.03)
    assert transmurality(QUARTER, EMIDEC) > 0.95
    depths = [transmurality(RING.with_lesion(MI, (0, 90), (0.0, d)), EMIDEC) for d in (0.25, 0.5, 0.75)]
    assert depths == sorted(depths)
    assert depths[1] == pytest.approx(0.5, abs=0.12)
    assert transmurality(RING.label_map, EMIDEC) == 0.0


def test_slice_count():
    assert lesion_slice_count(RING.with_lesion(MI, (0, 90), slices=range(1, 4)), EMIDEC) == 3
    assert lesion_slice_count(RING.label_map, EMIDEC) == 0


def test_iou_of_known_voxel_sets():
    a = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
    b = np.array([[0, 0, 0], [0, 0, 1], [5, 1, 0], [5, 1, 1]])
    assert voxel_iou(a, a) == 1.0
    assert voxel_iou(a, b) == pytest.approx(2 / 6)
    assert voxel_iou(a, np.zeros((0, 3), dtype=int)) == 0.0


def test_nearest_iou_compares_shape_around_the_lv_centre():
    voxels = aligned_lesion_voxels(QUARTER, EMIDEC)
    assert nearest_iou(voxels, [voxels]) == 1.0
    moved = ring_case(apex=False, size=48, shift=(5, -3))
    moved_quarter = aligned_lesion_voxels(moved.with_lesion(MI, (0, 90)), EMIDEC)
    other = aligned_lesion_voxels(RING.with_lesion(MI, (180, 270)), EMIDEC)
    half = aligned_lesion_voxels(RING.with_lesion(MI, (0, 45)), EMIDEC)
    assert nearest_iou(voxels, [moved_quarter]) == 1.0
    assert nearest_iou(voxels, [other]) == 0.0
    assert nearest_iou(voxels, [other, half]) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(LeFusionError):
        nearest_iou(voxels, [])


def test_phantom_lesions_measure_in_range_and_align_with_themselves():
    pathological = [case for case in phantom_cases() if (case.label >= MI).any()]
    assert pathological
    for case in pathological:
        assert 0 < lesion_volume_fraction(case.label, EMIDEC) < 1
        assert 0 < transmurality(case.label, EMIDEC, spacing=case.spacing) <= 1
        assert 1 <= lesion_slice_count(case.label, EMIDEC) <= case.label.shape[0]
        voxels = aligned_lesion_voxels(case.label, EMIDEC)
        shifted = aligned_lesion_voxels(np.pad(case.label, ((1, 0), (4, 0), (0, 3))), EMIDEC)
        assert nearest_iou(voxels, [shifted]) == 1.0


def test_ks_statistic():
    assert ks_statistic([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0.0
    assert ks_statistic([0.1, 0.2], [0.8, 0.9, 1.0]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    with pytest.raises(LeFusionError):
        ks_statistic([], [1.0])
