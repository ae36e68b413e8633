"""Rule-based lesion masks: coronary-territory infarct wedges growing from the subendocardium, with nested cores.

Orientation assumption: Emidec has no right-ventricle label, so the septum cannot be located from the masks.
Territories are therefore angle ranges in image axes (see ``geometry``), assuming the usual short-axis display
(anterior wall up, septum on the image left, lateral wall right, inferior wall down), and every lesion's
centre gets a uniform random rotation of up to ``rotation_jitter`` degrees. Set the jitter to 180 when the
orientation of the data is unknown: lesions are then placed at any angle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.geometry import MyocardialCoordinates, Spacing, myocardial_coordinates

# Counter-clockwise angle ranges in degrees (0 = image right, 90 = image up), AHA segments of the short axis.
TERRITORIES: dict[str, tuple[float, float]] = {
    "LAD": (60.0, 180.0),   # anterior + anteroseptal
    "RCA": (180.0, 300.0),  # inferoseptal + inferior
    "LCx": (300.0, 420.0),  # inferolateral + anterolateral
}
# Lesion pieces on adjacent slices are one piece when their in-plane footprints touch, diagonals included.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
_EDGE_DEPTH = 0.7       # at the wedge's angular edges the lesion reaches this fraction of its central depth
_BOUNDARY_NOISE = 0.1   # relative amplitude of the smooth random ripple of the lesion's depth along the angle
_DRIFT = 0.15  # s.d. of the wedge centre's drift from one slice to the next, relative to the wedge's half width


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 3D component of a boolean mask under ``CONNECTIVITY`` (empty stays empty)."""
    components, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise LeFusionError(f"{name} must be a (min, max) pair with {low} <= min <= max <= {high}, got {value}")


def _wrapped(angle: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * angle))


@dataclass(frozen=True)
class RuleBasedMaskGenerator:
    """Draws one infarct per call on the host organ of a label map, plus nested cores for the inner lesions.

    - ``size``: outer lesion volume as a fraction of the host organ (organ plus lesions), drawn uniformly;
      reached by widening the wedge, capped at the full circumference of the chosen slices.
    - ``transmurality``: normalised depth the wedge reaches at its centre (0 endocardium, 1 epicardium).
    - ``slices``: number of adjacent host slices the lesion spans (capped at the slices available).
    - ``core_size``: each inner lesion (Emidec: MVO) as a fraction of the lesion around it.
    - ``core_probability``: chance of each inner lesion when the caller does not ask for classes.
    """

    labels: LesionLabels = LesionLabels.emidec()
    size: tuple[float, float] = (0.05, 0.25)
    transmurality: tuple[float, float] = (0.25, 1.0)
    slices: tuple[int, int] = (2, 5)
    core_size: tuple[float, float] = (0.05, 0.3)
    core_probability: float = 0.5
    territories: tuple[str, ...] = ("LAD", "LCx", "RCA")
    rotation_jitter: float = 20.0

    def __post_init__(self) -> None:
        _check_range("size", self.size, 0.0, 1.0)
        _check_range("transmurality", self.transmurality, 0.0, 1.0)
        _check_range("core_size", self.core_size, 0.0, 1.0)
        _check_range("slices", self.slices, 1, np.inf)
        if not all(isinstance(count, (int, np.integer)) for count in self.slices):
            raise LeFusionError(f"slices must be whole numbers, got {self.slices}")
        if self.size[0] <= 0 or self.transmurality[0] <= 0 or self.core_size[0] <= 0:
            raise LeFusionError("size, transmurality and core_size must be above 0")
        if self.core_size[1] >= 1:
            raise LeFusionError(f"core_size must stay below 1 to leave a lesion around the core, got {self.core_size}")
        if not 0.0 <= self.core_probability <= 1.0:
            raise LeFusionError(f"core_probability must be in [0, 1], got {self.core_probability}")
        unknown = set(self.territories) - set(TERRITORIES)
        if not self.territories or unknown:
            raise LeFusionError(f"territories must be a non-empty subset of {sorted(TERRITORIES)}, "
                                f"got {self.territories}")

    def generate(self, label_map: np.ndarray, rng: np.random.Generator,
                 want_classes: Sequence[int] | None = None, spacing: Spacing = (1.0, 1.0, 1.0)) -> np.ndarray:
        """A lesion map (lesion labels, 0 elsewhere) of the shape of ``label_map``, lying inside its host organ.

        ``want_classes``: the lesion labels the result must contain; an inner lesion brings the lesions around
        it. ``None`` draws the outer lesion plus each inner one with ``core_probability``.
        """
        coords = myocardial_coordinates(label_map, self.labels, spacing)
        levels = self._levels(want_classes, rng)
        region = self._wedge(coords, rng)
        lesion_map = np.zeros(label_map.shape, dtype=label_map.dtype)
        lesion_map[region] = self.labels.lesions[0]
        for label in self.labels.lesions[1:levels]:
            region = self._core(coords, region, rng)
            lesion_map[region] = label
        return lesion_map

    def generate_many(self, label_maps: Sequence[np.ndarray], rng: np.random.Generator,
                      want_classes: Sequence[int] | None = None,
                      spacings: Sequence[Spacing] | None = None) -> list[np.ndarray]:
        """``generate`` for each label map in turn."""
        spacings = list(spacings) if spacings is not None else [(1.0, 1.0, 1.0)] * len(label_maps)
        return [self.generate(m, rng, want_classes, s) for m, s in zip(label_maps, spacings, strict=True)]

    def _levels(self, want_classes: Sequence[int] | None, rng: np.random.Generator) -> int:
        lesions = self.labels.lesions
        if want_classes is None:
            levels = 1
            while levels < len(lesions) and rng.random() < self.core_probability:
                levels += 1
            return levels
        unknown = set(want_classes) - set(lesions)
        if unknown or not want_classes:
            raise LeFusionError(f"want_classes must be a non-empty subset of the lesion labels {lesions}, "
                                f"got {list(want_classes)}")
        return 1 + max(lesions.index(label) for label in want_classes)

    def _wedge(self, coords: MyocardialCoordinates, rng: np.random.Generator) -> np.ndarray:
        host_slices = coords.slices
        count = min(int(rng.integers(self.slices[0], self.slices[1] + 1)), host_slices.size)
        run = host_slices[rng.integers(0, host_slices.size - count + 1):][:count]
        target = max(1, round(rng.uniform(*self.size) * coords.host.sum()))
        depth = rng.uniform(*self.transmurality)
        start, stop = TERRITORIES[self.territories[rng.integers(len(self.territories))]]
        centre = np.radians(rng.uniform(start, stop) + rng.uniform(-self.rotation_jitter, self.rotation_jitter))
        drift = np.cumsum(rng.normal(0.0, _DRIFT, count))
        widths = rng.uniform(0.6, 1.0, count)
        depths = depth * rng.uniform(0.85, 1.0, count)
        ripple = rng.normal(size=(count, 3, 2)) / np.arange(1, 4)[:, None]
        ripple *= _BOUNDARY_NOISE / np.abs(ripple).sum(axis=(1, 2), keepdims=True)

        in_run = np.zeros(coords.host.shape, dtype=bool)
        in_run[run] = coords.host[run]
        z, y, x = np.nonzero(in_run)
        slot = np.searchsorted(run, z)
        angle, inner = coords.angle[z, y, x], coords.inner[z, y, x]
        harmonics = np.arange(1, 4) * angle[:, None]
        wobble = 1.0 + (ripple[slot, :, 0] * np.cos(harmonics) + ripple[slot, :, 1] * np.sin(harmonics)).sum(axis=1)

        def inside(half_width: float) -> np.ndarray:
            offset = np.abs(_wrapped(angle - centre - half_width * drift[slot]))
            reach = np.minimum(half_width * widths[slot], np.pi)
            edge = np.minimum(offset / reach, 1.0)
            limit = depths[slot] * (1.0 - (1.0 - _EDGE_DEPTH) * edge ** 2) * wobble
            return (offset <= reach) & (inner < limit)

        low, high = 0.0, np.pi / widths.min()
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (low, mid) if inside(mid).sum() >= target else (mid, high)
        mask = np.zeros(coords.host.shape, dtype=bool)
        mask[z, y, x] = inside(high)
        return largest_component(mask)

    def _core(self, coords: MyocardialCoordinates, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The most central, most subendocardial part of ``region``, of ``core_size`` times its volume."""
        z, y, x = np.nonzero(region)
        angle = coords.angle[z, y, x]
        depth = (coords.inner[z, y, x] + coords.outer[z, y, x]) / 2
        offset = _wrapped(angle - np.angle(np.exp(1j * angle).mean()))
        spread = max(np.abs(offset).max(), 1e-6)
        half_span = (z.max() - z.min()) / 2 + 0.5
        mid_slice = (z.max() + z.min()) / 2 + rng.uniform(-0.25, 0.25) * half_span
        offset = offset - rng.uniform(-0.25, 0.25) * spread
        score = (offset / spread) ** 2 + (depth / max(depth.max(), 1e-6)) ** 2 + ((z - mid_slice) / half_span) ** 2
        count = min(max(1, round(rng.uniform(*self.core_size) * z.size)), z.size - 1)
        if count == 0:
            raise LeFusionError("the lesion is a single voxel, too small to hold an inner lesion")
        keep = np.argsort(score)[:count]
        core = np.zeros(region.shape, dtype=bool)
        core[z[keep], y[keep], x[keep]] = True
        return largest_component(core)
