"""Lesion ROIs for LeFusion: the host-organ window of a case in [-1, 1], its labels and its histogram condition.

The same :func:`lesion_roi` serves training (every lesion case of a dataset) and sampling (the case to
re-texture), so both see the window and the intensity mapping alike. ROI arrays are (D, H, W) = (Z, Y, X).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from nnunet_lefusion import roi
from nnunet_lefusion.diffusion.histograms import lesion_histograms, organ_level
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels

# How intensities reach [-1, 1]: the official per-volume min-max (torchio RescaleIntensity, percentiles 0-100).
INTENSITY_PERCENTILES = (0.0, 100.0)
FLIP_AXIS = 1  # ROI axis Y (NIfTI Y), the official RandomFlip(axes=1)


@dataclass
class LesionRoi:
    """One case's ROI: ``image`` in [-1, 1] float32, ``label`` the class map, ``spec`` to paste back."""

    image: np.ndarray
    label: np.ndarray
    spec: roi.RoiSpec


def lesion_roi(image: np.ndarray, label: np.ndarray, labels: LesionLabels, size: Sequence[int]) -> LesionRoi:
    """The ROI of ``size`` (Z, Y, X) centred on the host organ (organ + lesion labels) of a native-grid case."""
    spec = roi.locate_roi(image, label, labels.host, size, INTENSITY_PERCENTILES)
    return LesionRoi(roi.crop_image(image, spec), roi.crop(label, spec), spec)


def read_volume(path: str | Path) -> tuple[np.ndarray, sitk.Image]:
    """A 3D image file as a (Z, Y, X) array plus the SimpleITK image holding its header."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise LeFusionError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from None
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3:
        raise LeFusionError(f"{path} is not a 3D single-channel image (array shape {array.shape}).")
    return array, image


@dataclass
class RoiSet:
    """Training ROIs of a dataset: images (N, D, H, W) in [-1, 1], labels (N, D, H, W), conditions (N, cond_dim)
    and the ``organ_level`` of each ROI (N,)."""

    identifiers: list[str]
    images: np.ndarray
    labels: np.ndarray
    histograms: np.ndarray
    organ_levels: np.ndarray
    lesion_labels: tuple[int, ...]
    lesion_voxels_outside: int = 0

    def __len__(self) -> int:
        return len(self.identifiers)

    def make_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """A random batch (with replacement), each ROI flipped along Y with probability 1/2 (official).

        Returns ``x0`` (B, K, D, H, W) = the image repeated over the K lesion channels, ``label`` (B, D, H, W)
        and ``cond`` (B, 16 K); the histogram is flip-invariant.
        """
        index = rng.integers(len(self), size=batch_size)
        flip = rng.random(batch_size) < 0.5
        images = np.stack([np.flip(self.images[i], FLIP_AXIS) if f else self.images[i] for i, f in zip(index, flip)])
        labels = np.stack([np.flip(self.labels[i], FLIP_AXIS) if f else self.labels[i] for i, f in zip(index, flip)])
        k = len(self.lesion_labels)
        x0 = torch.from_numpy(images).unsqueeze(1).expand(-1, k, -1, -1, -1).contiguous()
        return {"x0": x0, "label": torch.from_numpy(labels.astype(np.int64)),
                "cond": torch.from_numpy(self.histograms[index])}


def load_roi_set(cases: Iterable[tuple[str, str | Path, str | Path]], labels: LesionLabels,
                 size: Sequence[int], progress: bool = True) -> RoiSet:
    """ROIs of the cases ``(identifier, image file, label file)`` that contain a lesion label.

    Cases without lesion voxels are left out; none left is a ``LeFusionError``. Lesion voxels that fall
    outside a case's window are counted in ``lesion_voxels_outside`` (they are not learned).
    """
    ids, images, label_maps, hists, levels = [], [], [], [], []
    outside = 0
    cases = list(cases)
    for identifier, image_file, label_file in tqdm(cases, desc="reading lesion ROIs", unit="case",
                                                   disable=not progress):
        label, _ = read_volume(label_file)
        lesion = np.isin(label, labels.lesions)
        if not lesion.any():
            continue
        image, _ = read_volume(image_file)
        if image.shape != label.shape:
            raise LeFusionError(f"case {identifier}: image {image.shape} and label {label.shape} differ in shape.")
        item = lesion_roi(image, label, labels, size)
        outside += int(lesion.sum()) - int(np.isin(item.label, labels.lesions).sum())
        ids.append(identifier)
        images.append(item.image)
        label_maps.append(item.label.astype(np.int16))
        hists.append(lesion_histograms(item.image, item.label, labels.lesions))
        levels.append(organ_level(item.image, item.label, labels.organ))
    if not ids:
        raise LeFusionError(f"none of the {len(cases)} training cases contains a lesion label {list(labels.lesions)}.")
    return RoiSet(ids, np.stack(images), np.stack(label_maps), np.stack(hists), np.asarray(levels),
                  tuple(labels.lesions), outside)
