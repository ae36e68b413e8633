"""Putting generated lesions on a case: old lesions are folded back into the organ, then new ones drawn in."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from scipy import ndimage

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.geometry import Spacing, host_mask


@runtime_checkable
class MaskGenerator(Protocol):
    """Anything that draws new lesion shapes on the host organ of a (Z, Y, X) label map."""

    def generate(self, label_map: np.ndarray, rng: np.random.Generator,
                 want_classes: Sequence[int] | None = None, spacing: Spacing = (1.0, 1.0, 1.0)) -> np.ndarray:
        """A lesion map: lesion labels where lesions go, 0 elsewhere; accepted by ``place_lesions``."""
        ...

    def generate_many(self, label_maps: Sequence[np.ndarray], rng: np.random.Generator,
                      want_classes: Sequence[int] | None = None,
                      spacings: Sequence[Spacing] | None = None) -> list[np.ndarray]:
        """``generate`` for several label maps (batched where the generator can batch)."""
        ...


def fold_lesions(label_map: np.ndarray, labels: LesionLabels) -> np.ndarray:
    """A copy of ``label_map`` with every lesion voxel given back to the (first) organ label."""
    folded = label_map.copy()
    folded[np.isin(label_map, labels.lesions)] = labels.organ[0]
    return folded


def check_lesion_map(label_map: np.ndarray, lesion_map: np.ndarray, labels: LesionLabels) -> None:
    """Raise ``LeFusionError`` unless ``lesion_map`` holds only lesion labels, inside the host organ, each inner
    lesion's every connected piece touching the lesion around it."""
    if lesion_map.shape != label_map.shape:
        raise LeFusionError(f"lesion map shape {lesion_map.shape} differs from label map shape {label_map.shape}")
    stray = set(np.unique(lesion_map).tolist()) - {0, *labels.lesions}
    if stray:
        raise LeFusionError(f"lesion map holds labels {sorted(stray)} that are not lesion labels {labels.lesions}")
    outside = int(((lesion_map > 0) & ~host_mask(label_map, labels)).sum())
    if outside:
        raise LeFusionError(f"{outside} lesion voxels lie outside the host organ (labels {labels.host})")
    touching = ndimage.generate_binary_structure(3, 3)
    for outer, inner in zip(labels.lesions, labels.lesions[1:]):
        pieces, count = ndimage.label(lesion_map == inner, structure=touching)
        around = ndimage.binary_dilation(lesion_map == outer, structure=touching)
        touched = np.unique(pieces[around & (pieces > 0)])
        if touched.size < count:
            raise LeFusionError(f"{count - touched.size} piece(s) of lesion {inner} do not touch lesion {outer}")


def place_lesions(label_map: np.ndarray, lesion_map: np.ndarray, labels: LesionLabels) -> np.ndarray:
    """A new label map: ``label_map`` with its own lesions folded into the organ and ``lesion_map`` drawn in."""
    check_lesion_map(label_map, lesion_map, labels)
    placed = fold_lesions(label_map, labels)
    drawn = lesion_map > 0
    placed[drawn] = lesion_map[drawn]
    return placed
