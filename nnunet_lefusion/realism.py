"""How a segmented DE-MRI case looks in numbers, and the Emidec ranges a realistic phantom case must fall in.

Contrast is counted as LGE studies count it: the CNR of a tissue is the difference of its median to the median of
the remote myocardium, divided by the remote myocardium's standard deviation (the reference region of the n-SD
rule): healthy-myocardium voxels whose in-plane neighbours are healthy myocardium too, at least 5 mm from any
lesion, so that partial volume with fat, blood or the lesion does not pass for noise. The same measures run on any
nnU-Net dataset whose labels name a host organ, a blood pool and lesions.

A network sees a whole heart crop, not per-structure statistics: :func:`crop_statistics` says where each Emidec
tissue sits in the crop's histogram, how far the crop spreads below and above healthy myocardium, and each tissue's
contrast to the whole healthy myocardium. ``EMIDEC_CROP`` holds those figures measured on 66 real Emidec cases,
``EMIDEC_LESION_EXTENT`` how much of the wall their lesions take (:func:`lesion_extent`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize, special

from nnunet_lefusion.labels import LesionLabels

FULL_SCALE = 4095.0   # 12-bit
REMOTE_MM = 5.0       # remote myocardium lies at least this far (in-plane) from any lesion
_PROFILE_MM = 6       # the border profile reaches this far into the lesion and the healthy wall
_ERF_20_80 = 1.6832   # 20-80 % rise of a Gaussian-blurred step, in units of the Gaussian's sigma
_IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
                      [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], dtype=bool)


@dataclass(frozen=True)
class Target:
    """A statistic's Emidec range (inclusive), what it measures, and whether every case must fall in it
    (``per_case``) or the median over the cases (texture measures, too noisy to judge one case by)."""

    key: str
    low: float
    high: float
    meaning: str
    per_case: bool = True

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high

    def holds_for(self, values: list[float]) -> bool | None:
        """Whether a set of cases meets the target; cases without the tissue (NaN) are left out, and None says
        that no case has it."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        return all(map(self.holds, finite)) if self.per_case else self.holds(float(np.median(finite)))


TARGETS = (
    Target("myocardium_level", 0.30, 0.70, "median of remote myocardium / 4095"),
    Target("myocardium_noise", 0.03, 0.10, "sd / median of remote myocardium"),
    Target("cnr_blood", 1.0, 5.0, "CNR of the blood pool"),
    Target("cnr_infarct", 1.5, 6.0, "CNR of the infarct"),
    Target("infarct_minus_blood", -1.5, 1.5, "CNR infarct - CNR blood pool"),
    Target("cnr_no_reflow", 0.5, 3.0, "CNR of no-reflow"),
    Target("infarct_minus_no_reflow", 0.5, math.inf, "CNR infarct - CNR no-reflow"),
    Target("heterogeneity", 1.2, 4.0, "sd of the infarct / sd of remote myocardium", per_case=False),
    Target("border_mm", 2.0, 8.0, "20-80 % width (mm) of the infarct's edge", per_case=False),
)


CROP_MARGIN = 16      # voxels around the box of the heart labels: the heart field of view a model is shown
CROP_TISSUES = {"cavity": 1, "myocardium": 2, "infarct": 3, "no_reflow": 4}   # Emidec label values
# median over 66 Emidec development cases (PNG export) of crop_statistics (benchmarks/sim_to_real.py --stats-only)
EMIDEC_CROP = {"p5/myo": 0.87, "p95/myo": 1.25, "pct_cavity": 69.1, "pct_myocardium": 35.9, "pct_infarct": 76.7,
               "pct_no_reflow": 54.7, "contrast_cavity": 1.98, "contrast_infarct": 2.07, "contrast_no_reflow": 1.43}

# medians of lesion_extent over the 44 pathological Emidec development cases (no-reflow: over the 26 that have it)
EMIDEC_LESION_EXTENT = {"lesion/wall": 0.195, "lesion_slices": 0.86, "no_reflow/wall": 0.015}


def heart_crop(label: np.ndarray, margin: int = CROP_MARGIN) -> tuple[slice, ...]:
    """(z, y, x): all slices, and the in-plane box of the foreground labels grown by ``margin`` voxels."""
    nonzero = np.nonzero(label)
    box = [slice(0, label.shape[0])]
    for axis in (1, 2):
        box.append(slice(max(int(nonzero[axis].min()) - margin, 0),
                         min(int(nonzero[axis].max()) + 1 + margin, label.shape[axis])))
    return tuple(box)


def crop_statistics(image: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """For a heart crop with Emidec labels: the crop's 5th/95th percentiles over healthy myocardium's median
    (``p5/myo``, ``p95/myo``), each tissue's median as a percentile of the crop (``pct_<tissue>``) and its contrast to
    healthy myocardium, median difference over the myocardium's sd (``contrast_<tissue>``); tissues with fewer than
    10 voxels are left out."""
    flat = np.sort(image.ravel())
    myocardium = image[label == CROP_TISSUES["myocardium"]]
    level, sd = float(np.median(myocardium)), float(myocardium.std())
    stats = {"p5/myo": float(np.percentile(flat, 5)) / level, "p95/myo": float(np.percentile(flat, 95)) / level}
    for name, value in CROP_TISSUES.items():
        region = image[label == value]
        if region.size >= 10:
            median = float(np.median(region))
            stats[f"pct_{name}"] = 100.0 * np.searchsorted(flat, median) / flat.size
            if name != "myocardium":
                stats[f"contrast_{name}"] = (median - level) / sd
    return stats


def _in_plane_distance(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane distance (mm) of every voxel to the nearest voxel of ``mask`` in its slice (inf where none)."""
    distance = np.full(mask.shape, np.inf)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        distance[z] = ndimage.distance_transform_edt(~mask[z], sampling=spacing[1:])
    return distance


def remote_myocardium(label: np.ndarray, spacing: tuple[float, float, float], organ: tuple[int, ...],
                      lesions: tuple[int, ...]) -> np.ndarray:
    """Healthy organ voxels with healthy in-plane neighbours, at least ``REMOTE_MM`` from any lesion."""
    healthy = np.isin(label, organ)
    interior = ndimage.binary_erosion(healthy, _IN_PLANE, border_value=1)
    return interior & (_in_plane_distance(np.isin(label, lesions), spacing) >= REMOTE_MM)


def _border_width(image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float], infarct: int,
                  lesions: tuple[int, ...], healthy: tuple[int, ...]) -> float:
    """Width (mm) of the infarct's edge: the mean intensity across the lesion border in 1 mm rings (in-plane,
    infarct core = 1, remote myocardium = 0), fitted by a blurred step, from 20 % to 80 % of the step.

    NaN when the case has too little infarct or healthy wall, or the infarct does not stand out (contrast < 1 sd).
    """
    lesion = np.isin(label, lesions)
    half = float(min(spacing[1:])) / 2   # the border lies half a voxel from the voxel centres on either side
    signed = np.where(lesion, half - _in_plane_distance(~lesion, spacing), _in_plane_distance(lesion, spacing) - half)
    is_infarct, is_healthy = (label == infarct) & np.isfinite(signed), np.isin(label, healthy) & np.isfinite(signed)
    remote = remote_myocardium(label, spacing, healthy, lesions)
    core = is_infarct & (signed <= -2.0)
    if remote.sum() < 20 or is_infarct.sum() < 20:
        return math.nan
    low, noise = float(np.median(image[remote])), float(image[remote].std())
    high = float(np.median(image[core] if core.sum() >= 10 else image[is_infarct]))
    if high - low < noise:
        return math.nan
    centres, levels = [], []
    for lo in np.arange(-_PROFILE_MM, _PROFILE_MM, 1.0):
        ring = (is_infarct if lo < 0 else is_healthy) & (signed >= lo) & (signed < lo + 1.0)
        if ring.sum() >= 5:
            centres.append(lo + 0.5)
            levels.append((float(image[ring].mean()) - low) / (high - low))
    if len(centres) < 6:
        return math.nan

    def edge(d, inside, outside, centre, sigma):
        return outside + (inside - outside) * 0.5 * special.erfc((d - centre) / (math.sqrt(2.0) * sigma))

    try:
        fit, _ = optimize.curve_fit(edge, centres, levels, p0=(1.0, 0.0, 0.0, 1.0),
                                    bounds=((0.0, -1.0, -4.0, 0.2), (2.0, 1.0, 4.0, 10.0)))
    except RuntimeError:
        return math.nan
    return _ERF_20_80 * float(fit[3])


def case_statistics(image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
                    roles: LesionLabels) -> dict[str, float]:
    """Every statistic of ``TARGETS`` for one case (NaN where the case lacks the tissue)."""
    remote = remote_myocardium(label, spacing, roles.organ, roles.lesions)
    if remote.sum() < 20:
        return {t.key: math.nan for t in TARGETS}
    level, sd = float(np.median(image[remote])), float(image[remote].std())

    def cnr(lab: int | None) -> float:
        region = label == lab
        return (float(np.median(image[region])) - level) / sd if lab is not None and region.sum() >= 10 else math.nan

    infarct = roles.lesions[0]
    no_reflow = roles.lesions[1] if len(roles.lesions) > 1 else None
    blood, outer, inner = cnr(roles.cavity), cnr(infarct), cnr(no_reflow)
    infarct_voxels = image[label == infarct]
    return {
        "myocardium_level": level / FULL_SCALE,
        "myocardium_noise": sd / level if level > 0 else math.nan,
        "cnr_blood": blood,
        "cnr_infarct": outer,
        "infarct_minus_blood": outer - blood,
        "cnr_no_reflow": inner,
        "infarct_minus_no_reflow": outer - inner,
        "heterogeneity": float(infarct_voxels.std()) / sd if infarct_voxels.size >= 10 else math.nan,
        "border_mm": _border_width(image, label, spacing, infarct, roles.lesions, roles.organ),
    }


def lesion_extent(label: np.ndarray) -> dict[str, float]:
    """For a case with Emidec labels: the lesion's (3 and 4) share of the wall (2, 3 and 4), the share of the wall's
    slices it reaches, and no-reflow's share of the wall (left out where there is none)."""
    wall = np.isin(label, (2, 3, 4))
    lesion = np.isin(label, (3, 4))
    extent = {"lesion/wall": lesion.sum() / wall.sum(),
              "lesion_slices": lesion.any(axis=(1, 2)).sum() / wall.any(axis=(1, 2)).sum()}
    if (label == 4).any():
        extent["no_reflow/wall"] = (label == 4).sum() / wall.sum()
    return {key: float(value) for key, value in extent.items()}
