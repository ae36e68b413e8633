"""Training pairs for the learned lesion-mask generator: lesion masks, their organ conditions and size controls.

A case is seen through a native-grid window of ``MaskGrid.window`` voxels (Z, Y, X) centred on the host organ,
optionally average-pooled in-plane by ``MaskGrid.pool`` onto a coarser network grid (default 1: native; on the
phantom, pooling by 2 alone already biases transmurality upwards, thin lesion edges being lost). Everything on the
network grid is in [-1, 1]; pooling leaves soft values on edges (lesion targets count the organ's voxels of a cell
only, so a cell half cavity, half lesion is all lesion).

- Targets, one channel per lesion class (outer to inner): the class's region, i.e. the class plus every lesion
  nested in it (Emidec: channel 0 = MI = labels 3 and 4, channel 1 = MVO = label 4), so nesting is a subset test.
- Condition maps (``CONDITION_CHANNELS``): the host organ (organ plus lesions), the cavity (orientation) and the
  control region, a DiffMask-style "control sphere" adapted to thick slices: a cylinder spanning the lesion's
  slices with a disc around its in-plane centroid (``LesionControl``).
- Condition vector: each class's volume fraction of the host organ and the MI transmurality, standardised by
  ``ControlScale``.

A ``LesionControl`` is stored relative to the organ (slice position and share of the host slices, in-plane offset
and radius in units of the organ's radius), so a control measured on one heart can be drawn on another.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_lefusion import roi
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.geometry import Spacing, host_mask, lesion_region, lv_centre
from nnunet_lefusion.masks.metrics import lesion_volume_fraction, transmurality
from nnunet_lefusion.training.roi_data import read_volume

CONDITION_CHANNELS = ("organ", "cavity", "control")


@dataclass(frozen=True)
class MaskGrid:
    """The native window (Z, Y, X) around the host organ and the in-plane pooling onto the network grid."""

    window: tuple[int, int, int] = (10, 64, 64)
    pool: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(int(v) for v in self.window))
        if len(self.window) != 3 or min(self.window) < 1 or self.pool < 1:
            raise LeFusionError(f"the mask window must be three positive sizes and the pooling >= 1, "
                                f"got {self.window} and {self.pool}.")
        if self.window[1] % self.pool or self.window[2] % self.pool:
            raise LeFusionError(f"the mask window's Y and X sizes {self.window[1:]} must be divisible by the "
                                f"pooling factor {self.pool}.")

    @property
    def size(self) -> tuple[int, int, int]:
        """The network grid (D, H, W)."""
        return self.window[0], self.window[1] // self.pool, self.window[2] // self.pool

    def to_dict(self) -> dict:
        return {"window": list(self.window), "pool": self.pool}

    @classmethod
    def from_dict(cls, values: dict) -> "MaskGrid":
        return cls(tuple(values["window"]), int(values["pool"]))


@dataclass(frozen=True)
class OrganFrame:
    """Where the host organ of a label map is: its voxels, slices, LV centre (z, y, x) in voxels, radius in mm.

    The radius is that of a disc with the mean per-slice area of organ plus cavity, a scale for the heart.
    """

    host: np.ndarray
    slices: np.ndarray
    centre: np.ndarray
    radius: float

    @classmethod
    def of(cls, label_map: np.ndarray, labels: LesionLabels, spacing: Spacing) -> "OrganFrame":
        host = host_mask(label_map, labels)
        if not host.any():
            raise LeFusionError(f"the label map has no host-organ voxels (labels {labels.host})")
        slices = np.flatnonzero(host.any(axis=(1, 2)))
        filled = host | (label_map == labels.cavity) if labels.cavity is not None else host
        area = filled[slices].sum(axis=(1, 2)).mean() * spacing[1] * spacing[2]
        return cls(host, slices, lv_centre(label_map, labels), float(np.sqrt(area / np.pi)))


@dataclass(frozen=True)
class LesionControl:
    """Size and location of one lesion relative to its organ (see the module docstring).

    ``slice_position``: middle of the lesion's slices, 0 at the first host slice, 1 at the last; ``slice_share``:
    lesion slices over host slices; ``offset`` (y, x): in-plane lesion centroid minus LV centre, and ``radius``:
    largest in-plane distance of a lesion voxel from that centroid (plus half a voxel), both over the organ
    radius; ``fractions``: volume fraction of the host organ per lesion class (its region), outer to inner;
    ``transmurality``: ``metrics.transmurality`` of the outer lesion.
    """

    slice_position: float
    slice_share: float
    offset: tuple[float, float]
    radius: float
    fractions: tuple[float, ...]
    transmurality: float

    @classmethod
    def measure(cls, label_map: np.ndarray, labels: LesionLabels, spacing: Spacing) -> "LesionControl":
        """The control of the lesions of a label map (``LeFusionError`` when it has none)."""
        region = lesion_region(label_map, labels)
        if not region.any():
            raise LeFusionError("the label map holds no lesion to measure a control from")
        frame = OrganFrame.of(label_map, labels, spacing)
        z, y, x = np.nonzero(region)
        first, last = frame.slices[0], frame.slices[-1]
        middle = (z.min() + z.max()) / 2
        mm = np.array([spacing[1], spacing[2]])
        centroid = np.array([y.mean(), x.mean()])
        reach = np.hypot((y - centroid[0]) * mm[0], (x - centroid[1]) * mm[1]).max() + mm.mean() / 2
        return cls(slice_position=float((middle - first) / (last - first)) if last > first else 0.5,
                   slice_share=float((z.max() - z.min() + 1) / (last - first + 1)),
                   offset=tuple(float(v) for v in (centroid - frame.centre[1:]) * mm / frame.radius),
                   radius=float(reach / frame.radius),
                   fractions=tuple(lesion_volume_fraction(label_map, labels, lesion) for lesion in labels.lesions),
                   transmurality=transmurality(label_map, labels, spacing=spacing))

    def region(self, frame: OrganFrame, spacing: Spacing, rotation: float = 0.0) -> np.ndarray:
        """The control cylinder on an organ, (Z, Y, X) bool; ``rotation`` (radians) turns the offset about
        the LV centre."""
        first, last = int(frame.slices[0]), int(frame.slices[-1])
        count = int(np.clip(round(self.slice_share * (last - first + 1)), 1, last - first + 1))
        middle = first + self.slice_position * (last - first)
        start = int(np.clip(round(middle - (count - 1) / 2), first, last - count + 1))
        cos, sin = np.cos(rotation), np.sin(rotation)
        dy, dx = self.offset
        offset = np.array([cos * dy - sin * dx, sin * dy + cos * dx]) * frame.radius
        rows, cols = np.indices(frame.host.shape[1:], dtype=float)
        distance = np.hypot((rows - frame.centre[1]) * spacing[1] - offset[0],
                            (cols - frame.centre[2]) * spacing[2] - offset[1])
        region = np.zeros(frame.host.shape, dtype=bool)
        region[start:start + count] = distance <= self.radius * frame.radius
        return region

    def vector(self) -> list[float]:
        """The raw condition vector: the fractions, then the transmurality."""
        return [*self.fractions, self.transmurality]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "LesionControl":
        return cls(float(values["slice_position"]), float(values["slice_share"]),
                   tuple(float(v) for v in values["offset"]), float(values["radius"]),
                   tuple(float(v) for v in values["fractions"]), float(values["transmurality"]))


@dataclass(frozen=True)
class ControlScale:
    """Standardisation of condition vectors: (vector - mean) / std, fitted on the training controls."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, controls: Sequence[LesionControl]) -> "ControlScale":
        vectors = np.array([c.vector() for c in controls], dtype=np.float64)
        return cls(tuple(float(v) for v in vectors.mean(axis=0)),
                   tuple(float(v) for v in np.maximum(vectors.std(axis=0), 1e-3)))

    def apply(self, controls: Sequence[LesionControl]) -> np.ndarray:
        """(N, K + 1) float32 condition vectors."""
        vectors = np.array([c.vector() for c in controls], dtype=np.float64)
        return ((vectors - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict) -> "ControlScale":
        return cls(tuple(float(v) for v in values["mean"]), tuple(float(v) for v in values["std"]))


def pool_in_plane(volume: np.ndarray, pool: int) -> np.ndarray:
    """Average (..., D, H, W) over ``pool`` x ``pool`` in-plane blocks."""
    *lead, d, h, w = volume.shape
    return volume.reshape(*lead, d, h // pool, pool, w // pool, pool).mean(axis=(-3, -1))


def pool_within(masks: np.ndarray, host: np.ndarray, pool: int) -> np.ndarray:
    """Pool (..., D, H, W) boolean masks as their share of the ``host`` voxels of each cell, in [-1, 1]; cells
    without host are -1."""
    host_share = pool_in_plane(host.astype(np.float32), pool)
    share = pool_in_plane((masks & host).astype(np.float32), pool) / np.maximum(host_share, 1e-6)
    return np.where(host_share > 0, 2.0 * share - 1.0, -1.0).astype(np.float32)


def signed(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as float32 in {-1, +1}."""
    return np.where(mask, 1.0, -1.0).astype(np.float32)


def generation_region(organ_map: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Network-grid cells holding any host-organ voxel (the organ channel above -1): where masks are learned and
    sampled; elsewhere they are known to be -1."""
    return organ_map > -1.0 + 1e-4


def condition_maps(label_map: np.ndarray, labels: LesionLabels, control_region: np.ndarray, spec: roi.RoiSpec,
                   pool: int) -> np.ndarray:
    """The (3, D, H, W) condition maps of ``CONDITION_CHANNELS`` on the network grid."""
    cavity = label_map == labels.cavity if labels.cavity is not None else np.zeros(label_map.shape, dtype=bool)
    maps = [signed(roi.crop(mask, spec)) for mask in (host_mask(label_map, labels), cavity, control_region)]
    return pool_in_plane(np.stack(maps), pool)


def organ_window(label_map: np.ndarray, labels: LesionLabels, grid: MaskGrid) -> roi.RoiSpec:
    """The native window of ``grid`` centred on the host organ (the label map stands in for the image: only
    the window is used, not the intensity mapping)."""
    return roi.locate_roi(label_map, label_map, labels.host, grid.window)


@dataclass
class MaskPairs:
    """Training pairs of a dataset: ``masks`` (N, K, D, H, W) targets, ``maps`` (N, 3, D, H, W) conditions,
    ``controls`` (one per case) and the lesion voxels that fell outside their window (not learned)."""

    identifiers: list[str]
    masks: np.ndarray
    maps: np.ndarray
    controls: list[LesionControl]
    lesion_voxels_outside: int = 0

    def __len__(self) -> int:
        return len(self.identifiers)

    def make_batch(self, rng: np.random.Generator, batch_size: int, scale: ControlScale) -> dict[str, torch.Tensor]:
        """A random batch (with replacement), each pair under random in-plane flips and, on a square grid, a random
        transpose (the same for masks and maps; the condition vector is invariant). Returns ``x0``, ``maps`` and
        ``cond``."""
        index = rng.integers(len(self), size=batch_size)
        square = self.masks.shape[-1] == self.masks.shape[-2]
        x0, maps = [], []
        for i in index:
            flip_y, flip_x, swap = rng.random(3) < 0.5
            pair = np.concatenate([self.masks[i], self.maps[i]])
            pair = pair[..., ::-1, :] if flip_y else pair
            pair = pair[..., ::-1] if flip_x else pair
            pair = pair.swapaxes(-1, -2) if swap and square else pair
            x0.append(pair[:self.masks.shape[1]])
            maps.append(pair[self.masks.shape[1]:])
        cond = scale.apply([self.controls[i] for i in index])
        return {"x0": torch.from_numpy(np.stack(x0)), "maps": torch.from_numpy(np.stack(maps)),
                "cond": torch.from_numpy(cond)}


def mask_pair(label_map: np.ndarray, labels: LesionLabels, spacing: Spacing, grid: MaskGrid
              ) -> tuple[np.ndarray, np.ndarray, LesionControl, int]:
    """One case's (targets, condition maps, control, lesion voxels outside the window)."""
    control = LesionControl.measure(label_map, labels, spacing)
    frame = OrganFrame.of(label_map, labels, spacing)
    spec = organ_window(label_map, labels, grid)
    regions = np.stack([lesion_region(label_map, labels, lesion) for lesion in labels.lesions])
    masks = pool_within(np.stack([roi.crop(r, spec) for r in regions]), roi.crop(frame.host, spec), grid.pool)
    maps = condition_maps(label_map, labels, control.region(frame, spacing), spec, grid.pool)
    outside = int(regions[0].sum()) - int(roi.crop(regions[0], spec).sum())
    return masks, maps, control, outside


def load_mask_pairs(label_files: Iterable[tuple[str, str | Path]], labels: LesionLabels, grid: MaskGrid,
                    progress: bool = True) -> MaskPairs:
    """Training pairs of the label files ``(identifier, path)`` that hold lesions (others are left out; none
    left is a ``LeFusionError``)."""
    ids, masks, maps, controls = [], [], [], []
    outside = 0
    files = list(label_files)
    for identifier, path in tqdm(files, desc="reading lesion masks", unit="case", disable=not progress):
        label_map, image = read_volume(path)
        if not np.isin(label_map, labels.lesions).any():
            continue
        target, condition, control, missed = mask_pair(label_map, labels, tuple(image.GetSpacing())[::-1], grid)
        ids.append(identifier)
        masks.append(target)
        maps.append(condition)
        controls.append(control)
        outside += missed
    if not ids:
        raise LeFusionError(f"none of the {len(files)} label files contains a lesion label {list(labels.lesions)}.")
    return MaskPairs(ids, np.stack(masks), np.stack(maps), controls, outside)
