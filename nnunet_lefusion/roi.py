"""The lesion ROI: a fixed-size window around the host organ, intensities mapped to [-1, 1], and paste-back.

Arrays are (Z, Y, X). The window may reach outside the volume (when the volume is smaller than the model
size); those voxels are padding, filled with -1 in the image crop and 0 in label crops, and are never pasted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from nnunet_lefusion.errors import LeFusionError

OFFICIAL_CARDIAC_SIZE = (10, 72, 72)
PAD_VALUE = -1.0


@dataclass(frozen=True)
class IntensityMap:
    """Affine map of native intensities [low, high] onto [-1, 1] (clipped), with its exact inverse."""

    low: float
    high: float

    @classmethod
    def fit(cls, image: np.ndarray, percentiles: tuple[float, float] = (0.0, 100.0)) -> "IntensityMap":
        """Percentile range of the whole image; (0, 100) is the official per-volume min-max."""
        values = np.asarray(image, dtype=np.float64)
        if values.size == 0 or not np.isfinite(values).all():
            raise LeFusionError("the image is empty or contains NaN/inf values, so it cannot be mapped to [-1, 1].")
        low, high = np.percentile(values, percentiles)
        return cls(float(low), float(high))

    @property
    def _half_range(self) -> float:
        return (self.high - self.low) / 2.0 if self.high > self.low else 0.5

    def to_unit(self, values: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
        """Native intensities -> [-1, 1] (float64 arithmetic, then ``dtype``)."""
        u = (np.asarray(values, dtype=np.float64) - self.low) / self._half_range - 1.0
        return np.clip(u, -1.0, 1.0).astype(dtype)

    def from_unit(self, u: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
        """[-1, 1] -> native intensities in ``dtype`` (integers are rounded and clipped to the dtype range)."""
        dtype = np.dtype(dtype)
        v = (np.asarray(u, dtype=np.float64) + 1.0) * self._half_range + self.low
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            v = np.clip(np.rint(v), info.min, info.max)
        return v.astype(dtype)


@dataclass(frozen=True)
class RoiSpec:
    """Where the ROI sits in the native volume and how its intensities were mapped (JSON-serialisable)."""

    volume_shape: tuple[int, int, int]
    start: tuple[int, int, int]  # window origin in native voxels; negative where the window pads
    size: tuple[int, int, int]
    intensity: IntensityMap
    dtype: str  # native image dtype, restored on paste-back

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoiSpec":
        return cls(tuple(d["volume_shape"]), tuple(d["start"]), tuple(d["size"]),
                   IntensityMap(**d["intensity"]), str(d["dtype"]))

    def overlap(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Slices (native, roi) of the part of the window that lies inside the volume."""
        native, roi = [], []
        for start, size, n in zip(self.start, self.size, self.volume_shape):
            lo, hi = max(start, 0), min(start + size, n)
            native.append(slice(lo, hi))
            roi.append(slice(lo - start, hi - start))
        return tuple(native), tuple(roi)

    def padding_mask(self) -> np.ndarray:
        """Boolean ROI-shaped array, True on padding voxels (outside the native volume)."""
        mask = np.ones(self.size, dtype=bool)
        mask[self.overlap()[1]] = False
        return mask


def _window_start(n: int, size: int, lo: int, hi: int) -> int:
    """Origin of a ``size`` window over an axis of length ``n`` centred on [lo, hi), kept inside if it fits."""
    if n <= size:
        return -((size - n + 1) // 2)  # pad: the start side gets the larger half
    return int(np.clip((lo + hi - size) // 2, 0, n - size))


def locate_roi(image: np.ndarray, label: np.ndarray, host_labels: Sequence[int],
               size: Sequence[int] = OFFICIAL_CARDIAC_SIZE,
               percentiles: tuple[float, float] = (0.0, 100.0)) -> RoiSpec:
    """The ROI centred on the bounding box of the host organ (``label`` in ``host_labels``).

    Emidec: host labels (2, 3, 4) = myocardium and lesions, size (10, 72, 72). The intensity map is fitted on
    the whole image (``percentiles`` (0, 100) = official min-max).
    """
    image, label = np.asarray(image), np.asarray(label)
    if image.ndim != 3 or image.shape != label.shape:
        raise LeFusionError(f"image {image.shape} and label {label.shape} must be 3D (Z, Y, X) of one shape.")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise LeFusionError(f"the ROI size must be three positive integers (Z, Y, X), got {size}.")
    host = np.isin(label, list(host_labels))
    if not host.any():
        raise LeFusionError(f"the label map has no voxel of the host labels {list(host_labels)}.")
    coords = np.nonzero(host)
    start = tuple(_window_start(n, s, int(c.min()), int(c.max()) + 1)
                  for n, s, c in zip(image.shape, size, coords))
    return RoiSpec(tuple(image.shape), start, size, IntensityMap.fit(image, percentiles), image.dtype.name)


def _covering_starts(n: int, size: int, centred: int, lo: int, hi: int) -> list[int]:
    """Window origins along one axis that together hold [lo, hi): the one nearest ``centred`` if one window holds
    it, else windows side by side from ``lo``, the last ending at ``hi``."""
    if n <= size:
        return [centred]
    if hi - lo <= size:
        return [int(np.clip(centred, hi - size, lo))]
    return [*range(lo, hi - size, size), hi - size]


def covering_rois(image: np.ndarray, label: np.ndarray, host_labels: Sequence[int], hold: Sequence[int],
                  size: Sequence[int] = OFFICIAL_CARDIAC_SIZE,
                  percentiles: tuple[float, float] = (0.0, 100.0)) -> list[RoiSpec]:
    """The ROI of :func:`locate_roi`, moved as little as needed to hold every voxel of the ``hold`` labels, or,
    where they are wider than one window, several windows side by side that together hold them (each holding
    some of them). All share the intensity map of the whole image."""
    centred = locate_roi(image, label, host_labels, size, percentiles)
    held = np.nonzero(np.isin(label, list(hold)))
    if not held[0].size:
        return [centred]
    axes = [_covering_starts(n, s, s0, int(c.min()), int(c.max()) + 1)
            for n, s, s0, c in zip(centred.volume_shape, centred.size, centred.start, held)]
    specs = [replace(centred, start=(z, y, x)) for z in axes[0] for y in axes[1] for x in axes[2]]
    selected = np.isin(label, list(hold))
    return [spec for spec in specs if selected[spec.overlap()[0]].any()]


def crop(volume: np.ndarray, spec: RoiSpec, fill=0) -> np.ndarray:
    """The window of a native-grid array (e.g. a label map), padding filled with ``fill``; same dtype."""
    volume = np.asarray(volume)
    if volume.shape != spec.volume_shape:
        raise LeFusionError(f"array shape {volume.shape} does not match the ROI's volume {spec.volume_shape}.")
    out = np.full(spec.size, fill, dtype=volume.dtype)
    native, roi = spec.overlap()
    out[roi] = volume[native]
    return out


def crop_image(image: np.ndarray, spec: RoiSpec) -> np.ndarray:
    """The image window mapped to [-1, 1] as float32; padding voxels are -1."""
    out = np.full(spec.size, PAD_VALUE, dtype=np.float32)
    roi = spec.overlap()[1]
    out[roi] = spec.intensity.to_unit(crop(image, spec)[roi])
    return out


def paste(volume: np.ndarray, roi_values: np.ndarray, where: np.ndarray, spec: RoiSpec) -> np.ndarray:
    """A copy of ``volume`` with ROI voxels selected by ``where`` replaced by ``roi_values`` (native domain).

    Padding voxels are skipped; every other native voxel is left bit-identical.
    """
    volume = np.asarray(volume)
    if volume.shape != spec.volume_shape or np.shape(roi_values) != spec.size or np.shape(where) != spec.size:
        raise LeFusionError("paste needs the ROI's native volume shape and ROI-shaped values and mask.")
    out = volume.copy()
    native, roi = spec.overlap()
    region = out[native]  # a view into ``out``
    sel = np.asarray(where, dtype=bool)[roi]
    region[sel] = np.asarray(roi_values)[roi][sel].astype(volume.dtype)
    return out


def paste_image(image: np.ndarray, roi_unit: np.ndarray, where: np.ndarray, spec: RoiSpec) -> np.ndarray:
    """Map [-1, 1] ROI values back to native intensities and paste them where ``where`` is True."""
    return paste(image, spec.intensity.from_unit(roi_unit, spec.dtype), where, spec)


def contains(spec: RoiSpec, label: np.ndarray, labels: Sequence[int]) -> bool:
    """True when every voxel of ``labels`` in the native ``label`` map lies inside the ROI window."""
    selected = np.isin(np.asarray(label), list(labels))
    native, _ = spec.overlap()
    return int(selected[native].sum()) == int(selected.sum())
