"""Label maps for the mask tests: hand-built stacked myocardial rings around an LV cavity, and phantom cases.

Ring geometry is computed here from the known radii (polar coordinates), independently of ``masks.geometry``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.phantom import PhantomCase, generate_case

EMIDEC = LesionLabels.emidec()
CAVITY, MYOCARDIUM, MI, MVO = 1, 2, 3, 4


@dataclass(frozen=True)
class Ring:
    """A (Z, Y, X) label map of rings; ``inner``/``outer`` are the per-slice radii in voxels (inner 0: apex disk)."""

    label_map: np.ndarray
    centre: tuple[float, float]
    inner: np.ndarray
    outer: np.ndarray

    def polar(self) -> tuple[np.ndarray, np.ndarray]:
        """Radius (voxels) and angle in degrees [0, 360), counter-clockwise from image right with rows down."""
        rows, cols = np.indices(self.label_map.shape[1:], dtype=float)
        dy, dx = self.centre[0] - rows, cols - self.centre[1]
        return np.hypot(dy, dx), np.mod(np.degrees(np.arctan2(dy, dx)), 360.0)

    def with_lesion(self, label: int, degrees: tuple[float, float], depth: tuple[float, float] = (0.0, 1.0),
                    slices: range | None = None, base: np.ndarray | None = None) -> np.ndarray:
        """A copy of ``base`` (default: the ring) with ``label`` on the myocardium inside the angle range and
        the fractional wall-depth range (0 endocardium, 1 epicardium) on the given slices."""
        result = (self.label_map if base is None else base).copy()
        radius, angle = self.polar()
        start, stop = degrees
        in_angle = np.mod(angle - start, 360.0) <= stop - start
        for z in slices if slices is not None else range(result.shape[0]):
            fraction = (radius - self.inner[z]) / (self.outer[z] - self.inner[z])
            wall = np.isin(result[z], (MYOCARDIUM, MI, MVO))
            result[z][wall & in_angle & (fraction >= depth[0]) & (fraction <= depth[1])] = label
        return result


def ring_case(slices: int = 6, size: int = 40, inner: float = 6.5, outer: float = 11.5, apex: bool = True,
              shift: tuple[int, int] = (0, 0)) -> Ring:
    """Rings shrinking towards the last slice; with ``apex`` the last slice is a solid myocardial disk."""
    scale = np.linspace(1.0, 0.7, slices)
    inner_r, outer_r = inner * scale, outer * scale
    if apex:
        inner_r[-1] = 0.0
    centre = (size / 2 - 0.5 + shift[0], size / 2 - 0.5 + shift[1])
    rows, cols = np.indices((size, size), dtype=float)
    radius = np.hypot(rows - centre[0], cols - centre[1])
    label_map = np.zeros((slices, size, size), dtype=np.uint8)
    for z in range(slices):
        label_map[z][radius < outer_r[z]] = MYOCARDIUM
        label_map[z][radius < inner_r[z]] = CAVITY
    return Ring(label_map, centre, inner_r, outer_r)


def phantom_cases(count: int = 6, seed: int = 0) -> list[PhantomCase]:
    """Small heart-FOV phantom cases, alternating pathological and normal."""
    return [generate_case(np.random.default_rng([seed, i]), pathological=i % 2 == 0, fov="heart")
            for i in range(count)]
