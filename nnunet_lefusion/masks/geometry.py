"""Myocardial coordinates read from a label map alone: LV centre per slice, angle around it, transmural depth.

Slices are thick compared with the in-plane resolution, so everything here is computed per slice in-plane.
Angles are measured in image axes (rows pointing down): 0 = image right, pi/2 = image up, pi = image left,
3pi/2 = image down, increasing counter-clockwise as displayed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels

Spacing = tuple[float, float, float]
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)   # a voxel's 8 neighbours within its slice (and itself)
IN_PLANE[1] = True


def host_mask(label_map: np.ndarray, labels: LesionLabels) -> np.ndarray:
    """Voxels a lesion may occupy: the organ labels plus the lesion labels."""
    return np.isin(label_map, labels.host)


def lesion_region(label_map: np.ndarray, labels: LesionLabels, lesion: int | None = None) -> np.ndarray:
    """Voxels of ``lesion`` and of every lesion nested inside it; by default the outermost lesion, i.e. all lesions."""
    lesion = labels.lesions[0] if lesion is None else lesion
    if lesion not in labels.lesions:
        raise LeFusionError(f"label {lesion} is not one of the lesion labels {labels.lesions}")
    return np.isin(label_map, labels.lesions[labels.lesions.index(lesion):])


def _check_label_map(label_map: np.ndarray) -> None:
    if label_map.ndim != 3:
        raise LeFusionError(f"a label map must be a 3D (Z, Y, X) array, got shape {label_map.shape}")


def cavity_masks(label_map: np.ndarray, labels: LesionLabels) -> np.ndarray:
    """The LV cavity of every slice that holds host organ, (Z, Y, X) bool.

    A slice without cavity (apex) borrows the cavity of the nearest slice that has one: the tissue under it
    is the endocardial side of the apical cap. Without any cavity label, a slice's cavity is the voxel at
    the centroid of its host organ.
    """
    _check_label_map(label_map)
    host = host_mask(label_map, labels)
    own = label_map == labels.cavity if labels.cavity is not None else np.zeros(label_map.shape, dtype=bool)
    with_cavity = np.flatnonzero(own.any(axis=(1, 2)))
    cavities = np.zeros(label_map.shape, dtype=bool)
    for z in np.flatnonzero(host.any(axis=(1, 2))):
        if with_cavity.size:
            cavities[z] = own[with_cavity[np.argmin(np.abs(with_cavity - z))]]
        else:
            cy, cx = np.round(np.argwhere(host[z]).mean(axis=0)).astype(int)
            cavities[z, cy, cx] = True
    return cavities


def slice_centres(label_map: np.ndarray, labels: LesionLabels) -> np.ndarray:
    """LV centre (y, x) in voxels per slice, shape (Z, 2): the centroid of ``cavity_masks``; NaN on slices
    without host organ."""
    cavities = cavity_masks(label_map, labels)
    centres = np.full((label_map.shape[0], 2), np.nan)
    for z in np.flatnonzero(cavities.any(axis=(1, 2))):
        centres[z] = np.argwhere(cavities[z]).mean(axis=0)
    return centres


def lv_centre(label_map: np.ndarray, labels: LesionLabels) -> np.ndarray:
    """LV centre (z, y, x) in voxels: the middle host slice and the mean of the per-slice centres."""
    centres = slice_centres(label_map, labels)
    slices = np.flatnonzero(~np.isnan(centres[:, 0]))
    if slices.size == 0:
        raise LeFusionError(f"the label map has no host-organ voxels (labels {labels.host})")
    return np.array([(slices[0] + slices[-1]) / 2, *centres[slices].mean(axis=0)])


@dataclass(frozen=True)
class MyocardialCoordinates:
    """Per-voxel coordinates of the host organ (organ plus lesions); NaN outside it.

    ``angle`` is in [0, 2pi) around the slice's LV centre (module docstring gives the axes). ``inner`` and
    ``outer`` are the normalised transmural depths of a voxel's endocardial and epicardial edges
    (0 = endocardium, 1 = epicardium), from in-plane distance transforms to the cavity and to the outside.
    Slices without cavity (apex) measure depth from a borrowed cavity (``cavity_masks``).
    """

    host: np.ndarray
    centres: np.ndarray
    angle: np.ndarray
    inner: np.ndarray
    outer: np.ndarray

    @property
    def slices(self) -> np.ndarray:
        """Indices of the slices that contain host organ, ascending."""
        return np.flatnonzero(~np.isnan(self.centres[:, 0]))


def myocardial_coordinates(label_map: np.ndarray, labels: LesionLabels,
                           spacing: Spacing = (1.0, 1.0, 1.0)) -> MyocardialCoordinates:
    """Angle and normalised transmural depth of every host-organ voxel of a (Z, Y, X) label map."""
    cavities = cavity_masks(label_map, labels)
    host = host_mask(label_map, labels)
    if not host.any():
        raise LeFusionError(f"the label map has no host-organ voxels (labels {labels.host})")
    sy, sx = float(spacing[1]), float(spacing[2])
    step = (sy + sx) / 2
    angle, inner, outer = (np.full(label_map.shape, np.nan) for _ in range(3))
    rows, cols = np.indices(label_map.shape[1:], dtype=float)
    centres = np.full((label_map.shape[0], 2), np.nan)
    for z in np.flatnonzero(host.any(axis=(1, 2))):
        cavity = cavities[z]
        centres[z] = np.argwhere(cavity).mean(axis=0)
        cy, cx = centres[z]
        to_cavity = ndimage.distance_transform_edt(~cavity, sampling=(sy, sx))
        to_outside = ndimage.distance_transform_edt(np.pad(host[z] | cavity, 1), sampling=(sy, sx))[1:-1, 1:-1]
        thickness = np.maximum(to_cavity + to_outside - step, step)
        on = host[z]
        angle[z][on] = np.mod(np.arctan2((cy - rows[on]) * sy, (cols[on] - cx) * sx), 2 * np.pi)
        inner[z][on] = np.clip((to_cavity[on] - step) / thickness[on], 0.0, 1.0)
        outer[z][on] = np.clip(to_cavity[on] / thickness[on], 0.0, 1.0)
    return MyocardialCoordinates(host=host, centres=centres, angle=angle, inner=inner, outer=outer)
