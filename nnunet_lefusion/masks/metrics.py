"""Measurements of lesion masks, to compare generated with real ones (the mask-realism benchmark).

A lesion's region is its own label plus every lesion nested inside it (Emidec: MI = labels 3 and 4).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.geometry import (IN_PLANE, MyocardialCoordinates, Spacing, host_mask, lesion_region,
                                            lv_centre, myocardial_coordinates)


def lesion_volume_fraction(label_map: np.ndarray, labels: LesionLabels, lesion: int | None = None) -> float:
    """Voxels of the lesion region over voxels of the host organ (organ plus lesions)."""
    host = int(host_mask(label_map, labels).sum())
    if host == 0:
        raise LeFusionError(f"the label map has no host-organ voxels (labels {labels.host})")
    return float(lesion_region(label_map, labels, lesion).sum() / host)


def transmurality(label_map: np.ndarray, labels: LesionLabels, lesion: int | None = None,
                  spacing: Spacing = (1.0, 1.0, 1.0), sectors: int = 36) -> float:
    """Mean fraction of the wall thickness the lesion spans, 0 without lesion.

    Each slice is cut into ``sectors`` equal angular sectors around the LV centre; in every (slice, sector) that
    the lesion touches, the span is the deepest epicardial edge minus the shallowest endocardial edge of its
    lesion voxels, in normalised transmural depth (``geometry.myocardial_coordinates``). The spans are averaged
    with equal weight, so a fully transmural lesion scores about 1 and a subendocardial rim of half the wall
    about 0.5.
    """
    region = lesion_region(label_map, labels, lesion)
    if not region.any():
        return 0.0
    return region_transmurality(region, myocardial_coordinates(label_map, labels, spacing), sectors)


def region_transmurality(region: np.ndarray, coords: MyocardialCoordinates, sectors: int = 36) -> float:
    """``transmurality`` of a (Z, Y, X) bool region of the host organ, on precomputed coordinates."""
    if not region.any():
        return 0.0
    z = np.nonzero(region)[0]
    sector = np.minimum((coords.angle[region] / (2 * np.pi) * sectors).astype(int), sectors - 1)
    cells, cell = np.unique(z * sectors + sector, return_inverse=True)
    deepest = np.zeros(cells.size)
    shallowest = np.ones(cells.size)
    np.maximum.at(deepest, cell, coords.outer[region])
    np.minimum.at(shallowest, cell, coords.inner[region])
    return float(np.mean(deepest - shallowest))


def inner_lesion_exposure(label_map: np.ndarray, labels: LesionLabels) -> float | None:
    """Share of the in-plane neighbours of the innermost lesion that are healthy organ (no lesion, inside the
    organ); 0 when the lesion around it and the organ's borders enclose it, as infarct and cavity enclose real
    no-reflow. None when the map has no inner lesion."""
    inner = label_map == labels.lesions[-1]
    if len(labels.lesions) < 2 or not inner.any():
        return None
    around = ndimage.binary_dilation(inner, structure=IN_PLANE) & ~inner
    healthy = host_mask(label_map, labels) & ~lesion_region(label_map, labels)
    return float((around & healthy).sum() / max(int(around.sum()), 1))


def lesion_slice_count(label_map: np.ndarray, labels: LesionLabels, lesion: int | None = None) -> int:
    """Number of slices that contain the lesion region."""
    return int(lesion_region(label_map, labels, lesion).any(axis=(1, 2)).sum())


def aligned_lesion_voxels(label_map: np.ndarray, labels: LesionLabels, lesion: int | None = None) -> np.ndarray:
    """Integer (z, y, x) offsets of the lesion region's voxels from the LV centre (``geometry.lv_centre``,
    rounded), shape (N, 3); comparing these between cases compares lesion shape and position around the LV
    regardless of where the heart sits in the image. Only translation is removed: no rotation or scaling."""
    centre = np.floor(lv_centre(label_map, labels) + 0.5).astype(int)
    return np.argwhere(lesion_region(label_map, labels, lesion)) - centre


def voxel_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (N, 3) integer voxel-coordinate sets; 1 when both are empty."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    both = np.concatenate([a, b])
    keys = np.ravel_multi_index(tuple((both - both.min(axis=0)).T), tuple(np.ptp(both, axis=0) + 1))
    key_a, key_b = np.unique(keys[:len(a)]), np.unique(keys[len(a):])
    common = np.intersect1d(key_a, key_b, assume_unique=True).size
    return common / (key_a.size + key_b.size - common)


def nearest_iou(voxels: np.ndarray, references: Sequence[np.ndarray]) -> float:
    """The highest ``voxel_iou`` of one aligned lesion (``aligned_lesion_voxels``) with any reference lesion."""
    if not references:
        raise LeFusionError("nearest_iou needs at least one reference mask")
    return max(voxel_iou(voxels, reference) for reference in references)


def ks_statistic(sample: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (0 same distribution .. 1 disjoint)."""
    if len(sample) == 0 or len(reference) == 0:
        raise LeFusionError("the KS statistic needs two non-empty samples")
    from scipy import stats  # imported here: scipy.stats costs every command 0.6 s to start, and only this needs it

    return float(stats.ks_2samp(sample, reference).statistic)
