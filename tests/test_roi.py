"""ROI: window placement around the host organ, padding, exact intensity inverse, paste-back."""
import json

import numpy as np
import pytest

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.roi import (
    IntensityMap, RoiSpec, contains, covering_rois, crop, crop_image, locate_roi, paste, paste_image)


def _heart(shape=(12, 96, 100), centre=(6, 40, 60), dtype=np.int16):
    """A small heart-like label map (cavity 1, myocardium ring 2, infarct 3, no-reflow 4) and an image."""
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    r = np.sqrt((y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    label = np.zeros(shape, dtype=np.uint8)
    slab = np.abs(z - centre[0]) <= 3
    label[(r < 8) & slab] = 1
    label[(r >= 8) & (r < 13) & slab] = 2
    label[(r >= 8) & (r < 13) & slab & (y < centre[1] - 4)] = 3
    label[(r >= 9) & (r < 11) & slab & (y < centre[1] - 8)] = 4
    rng = np.random.default_rng(0)
    image = (rng.normal(300, 80, size=shape) + 400 * (label >= 3)).clip(0, 2000).astype(dtype)
    return image, label


def test_window_centred_on_host_and_inside_volume():
    image, label = _heart()
    spec = locate_roi(image, label, host_labels=(2, 3, 4))
    assert spec.size == (10, 72, 72) and spec.volume_shape == image.shape
    assert spec.start[1] == 40 - 36 and spec.start[2] == 60 - 36
    assert spec.start[0] == 1  # 12 slices: kept inside the volume
    assert not spec.padding_mask().any()
    assert contains(spec, label, (3, 4))
    roi_label = crop(label, spec)
    assert (roi_label == 3).sum() == (label == 3).sum()
    near_edge = locate_roi(*_heart(centre=(6, 10, 90)), host_labels=(2, 3, 4))
    assert near_edge.start[1] == 0 and near_edge.start[2] == 100 - 72


def test_windows_hold_every_lesion_voxel():
    image, label = _heart(centre=(6, 48, 50))
    label[label >= 3] = 2
    label[(label == 2) & (np.arange(100) > 60)[None, None, :]] = 3   # an infarct on the far lateral edge only
    centred = locate_roi(image, label, (2, 3, 4), size=(10, 20, 20))
    (held,) = covering_rois(image, label, (2, 3, 4), (3, 4), size=(10, 20, 20))
    assert not contains(centred, label, (3, 4)) and contains(held, label, (3, 4))
    assert held.start[:2] == centred.start[:2] and held.start[2] > centred.start[2]   # moved only where needed
    assert held.intensity == centred.intensity
    several = covering_rois(image, label, (2, 3, 4), (3, 4), size=(2, 8, 20))   # the infarct: 7 slices, 15 rows
    covered = np.zeros(label.shape, bool)
    for spec in several:
        covered[spec.overlap()[0]] = True
    assert len(several) > 1 and covered[label == 3].all()
    assert all((label[spec.overlap()[0]] == 3).any() for spec in several)   # no window without a lesion voxel


def test_small_volume_is_padded_with_minus_one():
    image, label = _heart(shape=(7, 60, 80), centre=(3, 30, 40))
    spec = locate_roi(image, label, host_labels=(2, 3, 4))
    assert spec.start == (-2, -6, 4)
    pad = spec.padding_mask()
    assert pad.sum() == 10 * 72 * 72 - 7 * 60 * 72
    roi = crop_image(image, spec)
    assert roi.dtype == np.float32 and roi.shape == (10, 72, 72)
    assert (roi[pad] == -1).all() and roi.min() >= -1 and roi.max() <= 1
    assert (crop(label, spec)[pad] == 0).all()
    assert np.array_equal(pad[:, 10, 10], [True, True] + [False] * 7 + [True])


def test_intensity_map_is_exactly_invertible():
    rng = np.random.default_rng(2)
    ints = rng.integers(-1024, 3000, size=(4, 8, 8)).astype(np.int16)
    imap = IntensityMap.fit(ints)
    unit = imap.to_unit(ints)
    assert unit.min() == -1 and unit.max() == 1 and unit.dtype == np.float32
    np.testing.assert_array_equal(imap.from_unit(unit, "int16"), ints)
    floats = rng.normal(100, 30, size=(4, 8, 8)).astype(np.float32)
    fmap = IntensityMap.fit(floats)
    np.testing.assert_array_equal(fmap.from_unit(fmap.to_unit(floats, np.float64), np.float32), floats)
    robust = IntensityMap.fit(floats, percentiles=(5, 95))
    assert robust.to_unit(floats).min() == -1 and (robust.to_unit(floats) == 1).sum() > 1
    with pytest.raises(LeFusionError):
        IntensityMap.fit(np.array([1.0, np.nan]))


def test_paste_changes_only_selected_voxels_bit_identically():
    image, label = _heart(shape=(7, 60, 80), centre=(3, 30, 40))
    spec = locate_roi(image, label, host_labels=(2, 3, 4))
    roi_label = crop(label, spec)
    where = (roi_label == 3) | (roi_label == 4) | spec.padding_mask()
    new = np.full(spec.size, 0.5, dtype=np.float32)
    out = paste_image(image, new, where, spec)
    lesion = (label == 3) | (label == 4)
    assert out.dtype == image.dtype
    np.testing.assert_array_equal(out[~lesion], image[~lesion])
    assert (out[lesion] == spec.intensity.from_unit(np.float32(0.5), image.dtype)).all()
    unchanged = paste_image(image, crop_image(image, spec), np.ones(spec.size, bool), spec)
    np.testing.assert_array_equal(unchanged, image)
    relabelled = paste(label, np.where(roi_label == 4, 3, roi_label), roi_label == 4, spec)
    assert (relabelled == 4).sum() == 0 and (relabelled == 3).sum() == lesion.sum()


def test_spec_serialises_and_rejects_bad_input():
    image, label = _heart()
    spec = locate_roi(image, label, host_labels=(2, 3, 4), size=(8, 32, 32))
    assert RoiSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(LeFusionError):
        locate_roi(image, np.zeros_like(label), host_labels=(2, 3, 4))
    with pytest.raises(LeFusionError):
        crop(label[:5], spec)
