"""Preview pictures zoom on the organ: on a large field of view a new lesion covers only a few dozen pixels."""
from __future__ import annotations

import matplotlib.image
import numpy as np

from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.preview import organ_box, preview_figure

EMIDEC = LesionLabels.emidec()


def _slice_with_small_heart(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A size x size slice whose myocardium ring (label 2) lies in rows 100-139, cols 60-99, with a 5x6 infarct."""
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - 119.5, xx - 79.5)
    seg = np.zeros((size, size), np.uint8)
    seg[radius < 12] = 1
    seg[(radius >= 12) & (radius < 20)] = 2
    seg[100:105, 77:83] = 3
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (size, size)) + 50 * (seg == 2) + 120 * (seg == 3)
    return image.astype(np.float32), seg


def test_the_box_holds_the_organ_and_its_lesions_of_every_plane_with_a_margin_and_stays_in_the_plane():
    _, seg = _slice_with_small_heart()
    other = np.zeros_like(seg)
    other[150:152, 90:92] = 4  # a lesion on the second plane only, outside the first plane's organ
    rows, cols = organ_box([seg, other], EMIDEC, margin=0.25, min_margin=8)
    # host rows 100..151, cols 60..99: larger side 52 -> pad 13
    assert (rows.start, rows.stop, cols.start, cols.stop) == (100 - 13, 152 + 13, 60 - 13, 100 + 13)
    edge = np.zeros_like(seg)
    edge[0:10, 250:256] = 2
    rows, cols = organ_box([edge], EMIDEC)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 18, 242, 256)
    rows, cols = organ_box([np.zeros_like(seg)], EMIDEC)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 256, 0, 256)


def test_each_saved_panel_shows_the_organ_box_not_the_whole_field_of_view(tmp_path):
    image, seg = _slice_with_small_heart()
    synthetic_seg = seg.copy()
    synthetic_seg[130:136, 62:66] = 3  # a new lesion on the other side of the wall
    fig = preview_figure([(image, seg, "real"), (image, synthetic_seg, "synthetic")], EMIDEC)
    rows, cols = organ_box([seg, synthetic_seg], EMIDEC)
    assert rows.stop - rows.start < 80 and cols.stop - cols.start < 80  # a small part of the 256 x 256 slice
    for ax in fig.axes:
        shown = ax.images[0].get_array()
        assert shown.shape == (rows.stop - rows.start, cols.stop - cols.start)
        assert np.array_equal(np.asarray(shown), image[rows, cols])
        # the axes keep the slice's pixel coordinates, so outlines and image agree
        assert ax.get_xlim() == (cols.start - 0.5, cols.stop - 0.5)
        assert ax.get_ylim() == (rows.stop - 0.5, rows.start - 0.5)
        assert ax.collections  # the lesion outline is drawn
    path = tmp_path / "preview.png"
    fig.savefig(path, dpi=90)
    picture = matplotlib.image.imread(path)
    assert picture.shape[0] > 100 and picture.shape[1] > 200
    # the infarct (30 of 65,536 pixels of the slice) is 1 % of the panel, not 0.05 %
    assert (seg[rows, cols] == 3).mean() > 0.005
