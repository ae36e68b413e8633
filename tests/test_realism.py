"""Realism statistics: known contrasts are measured back, remote myocardium keeps away from lesions and edges,
a blurred lesion border measures wider than a sharp one, and the benchmark measures a raw dataset."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.phantom import write_dataset
from nnunet_lefusion.realism import (REMOTE_MM, TARGETS, case_statistics, crop_statistics, heart_crop,
                                     remote_myocardium)

ROOT = Path(__file__).resolve().parents[1]
SPACING = (10.0, 1.25, 1.25)
LEVELS = {1: 1150.0, 2: 1000.0, 3: 1200.0, 4: 1075.0}   # myocardium 1000 with sd 50: CNRs 3, 4, 1.5


def ring_case(blur: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Six slices of an LV ring (cavity 1, wall 2) with an infarct sector (3) around a no-reflow core (4)."""
    y, x = np.mgrid[:64, :64] - 31.5
    radius, angle = np.hypot(x, y), np.arctan2(y, x)
    plane = np.zeros((64, 64), np.uint8)
    plane[radius < 24] = 2
    plane[radius < 14] = 1
    plane[(plane == 2) & (np.abs(angle) < 0.8)] = 3
    plane[(plane == 3) & (np.abs(angle) < 0.25) & (radius < 18)] = 4
    label = np.repeat(plane[None], 6, axis=0)
    clean = np.vectorize(LEVELS.get)(label, 0.0)
    if blur:   # enhancement fades into the wall, as on real scans
        excess = ndimage.gaussian_filter(np.where(label >= 3, clean - 1000.0, 0.0), (0, blur, blur))
        clean = np.where(label >= 2, 1000.0 + excess, clean)
    return clean + np.random.default_rng(seed).normal(0.0, 50.0, label.shape), label


def test_known_contrasts_are_measured_back():
    image, label = ring_case()
    stats = case_statistics(image, label, SPACING, LesionLabels.emidec())
    assert stats["myocardium_level"] == pytest.approx(1000 / 4095, rel=0.01)
    assert stats["myocardium_noise"] == pytest.approx(0.05, rel=0.05)
    for key, expected in (("cnr_blood", 3.0), ("cnr_infarct", 4.0), ("cnr_no_reflow", 1.5),
                          ("infarct_minus_blood", 1.0), ("infarct_minus_no_reflow", 2.5)):
        assert stats[key] == pytest.approx(expected, abs=0.15), key
    assert stats["heterogeneity"] == pytest.approx(1.0, abs=0.1)   # noise only: not patchy


def test_heart_crop_is_the_label_box_plus_a_margin_clipped_to_the_image():
    label = np.zeros((3, 40, 50), np.uint8)
    label[1, 10:20, 30:45] = 2
    assert heart_crop(label, 4) == (slice(0, 3), slice(6, 24), slice(26, 49))
    assert heart_crop(label, 12) == (slice(0, 3), slice(0, 32), slice(18, 50))


def test_crop_statistics_measure_known_levels_back():
    image, label = ring_case()
    stats = crop_statistics(image, label)
    for key, expected in (("contrast_cavity", 3.0), ("contrast_infarct", 4.0), ("contrast_no_reflow", 1.5)):
        assert stats[key] == pytest.approx(expected, abs=0.15), key
    # background (0) is the darkest tissue, then myocardium, no-reflow, cavity, infarct
    background = (label == 0).mean() * 100
    order = [stats[f"pct_{t}"] for t in ("myocardium", "no_reflow", "cavity", "infarct")]
    assert background < order[0] and order == sorted(order)
    assert stats["p5/myo"] < 0.05 and stats["p95/myo"] == pytest.approx(1.2, abs=0.08)
    label[label >= 3] = 2
    assert "contrast_infarct" not in crop_statistics(image, label)


def test_remote_myocardium_keeps_off_lesions_and_other_tissue():
    _, label = ring_case()
    remote = remote_myocardium(label, SPACING, (2,), (3, 4))
    assert remote.any() and (label[remote] == 2).all()
    near_lesion = ndimage.distance_transform_edt(label[0] < 3, sampling=SPACING[1:]) < REMOTE_MM
    assert not (remote[0] & near_lesion).any()
    touches_other = ndimage.binary_dilation(label[0] != 2, np.ones((3, 3), bool))
    assert not (remote[0] & touches_other).any()


def test_a_blurred_border_measures_wider_than_a_sharp_one():
    sharp = case_statistics(*ring_case(), SPACING, LesionLabels.emidec())["border_mm"]
    blurred = case_statistics(*ring_case(blur=2.0), SPACING, LesionLabels.emidec())["border_mm"]
    assert sharp < 2.0 < blurred


def test_missing_tissues_are_nan_and_left_out_of_the_verdict():
    image, label = ring_case()
    label[label >= 3] = 2   # a normal case
    stats = case_statistics(image, label, SPACING, LesionLabels.emidec())
    assert all(math.isnan(stats[k]) for k in ("cnr_infarct", "cnr_no_reflow", "heterogeneity", "border_mm"))
    cnr_infarct = next(t for t in TARGETS if t.key == "cnr_infarct")
    assert cnr_infarct.holds_for([math.nan, 2.0]) is True and cnr_infarct.holds_for([math.nan, 7.0]) is False
    assert cnr_infarct.holds_for([math.nan]) is None


def test_benchmark_measures_a_raw_dataset_and_writes_the_montage(tmp_path):
    raw = write_dataset(990, 4, seed=3, raw_root=tmp_path, fov="heart")
    png = tmp_path / "montage.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "phantom_realism.py"), "--raw", str(raw),
                           "-n", "4", "--png", str(png), "--montage-cases", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in {t.key for t in TARGETS}}
    assert set(rows) == {t.key for t in TARGETS}
    measurable = [key for key, line in rows.items() if "n/a" not in line]
    assert {"myocardium_level", "cnr_blood", "cnr_infarct"} <= set(measurable)
    for key in ("myocardium_level", "myocardium_noise", "cnr_blood", "cnr_infarct", "infarct_minus_blood"):
        assert rows[key].endswith("yes"), rows[key]
    held = sum(line.endswith("yes") for line in rows.values())
    assert lines[-1] == f"targets held: {held}/{len(measurable)} measurable on 4 cases ({raw.name})"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
