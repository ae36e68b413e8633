"""Look at a cache: preview pictures (real vs synthetic slices with the lesion outline) and NIfTI export."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.context import DatasetContext


def _datasets(ctx: DatasetContext, folder: Path, manifest: Manifest):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    sources = sorted({info["source"] for info in manifest.cases.values()})
    return nnUNetDatasetBlosc2(str(ctx.data_folder), sources), nnUNetDatasetBlosc2(str(folder), sorted(manifest.cases))


def _lesion_slice(seg: np.ndarray, lesions: tuple[int, ...]) -> int:
    """The slice (first spatial axis) with the most lesion voxels, else the middle one."""
    counts = np.isin(seg, lesions).sum(axis=(1, 2))
    return int(np.argmax(counts)) if counts.any() else seg.shape[0] // 2


def write_previews(ctx: DatasetContext, folder: Path, labels: LesionLabels, out: Path, limit: int | None = None) -> int:
    """One PNG per synthetic case: its source case and the synthetic case at the slice with the most synthetic
    lesion, lesion outlines drawn (first channel, nnU-Net's preprocessed grid). Returns the number written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = Manifest.load(folder)
    real_cases, synthetic_cases = _datasets(ctx, folder, manifest)
    out.mkdir(parents=True, exist_ok=True)
    chosen = sorted(manifest.cases)[:limit]
    for identifier in tqdm(chosen, desc="previews", unit="case"):
        info = manifest.cases[identifier]
        data, seg = synthetic_cases.load_case(identifier)[:2]
        real_data, real_seg = real_cases.load_case(info["source"])[:2]
        z = _lesion_slice(np.asarray(seg[0]), labels.lesions)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
        for ax, image, label, title in ((axes[0], real_data, real_seg, f"real {info['source']}"),
                                        (axes[1], data, seg, f"{identifier} ({info.get('kind', info.get('method'))})")):
            plane = np.asarray(image[0][z], dtype=np.float32)
            low, high = np.percentile(plane, [0.5, 99.5])
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            for value, colour in zip(labels.lesions, ("yellow", "red", "cyan", "magenta")):
                mask = np.asarray(label[0][z]) == value
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        tmp = out / f".{identifier}.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, out / f"{identifier}.png")
    return len(chosen)


def export_nifti(ctx: DatasetContext, folder: Path, out: Path) -> int:
    """Every synthetic case as ``<id>_0000.nii.gz`` (one file per channel) and ``<id>.nii.gz`` (label), in nnU-Net's
    preprocessed grid with the configuration's spacing (normalised intensities), for a viewer. Returns the count."""
    import SimpleITK as sitk

    manifest = Manifest.load(folder)
    _, synthetic_cases = _datasets(ctx, folder, manifest)
    grid = [float(s) for s in ctx.configuration_manager.spacing]
    first_axis = ctx.plans_manager.transpose_forward[0]
    out.mkdir(parents=True, exist_ok=True)
    for identifier in tqdm(sorted(manifest.cases), desc="export", unit="case"):
        data, seg, _, properties = synthetic_cases.load_case(identifier)
        # a 2d configuration resamples in-plane only: the slices keep the case's own spacing
        spacing = grid if len(grid) == 3 else [float(properties["spacing"][first_axis]), *grid]
        spacing = spacing[::-1]  # SimpleITK's (x, y, z)
        arrays = {f"{identifier}_{c:04d}.nii.gz": np.asarray(data[c], dtype=np.float32) for c in range(len(data))}
        arrays[f"{identifier}.nii.gz"] = np.asarray(seg[0]).astype(np.int16)
        for name, array in arrays.items():
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            tmp = out / f".tmp.{name}"
            sitk.WriteImage(image, str(tmp), True)
            os.replace(tmp, out / name)
    return len(manifest.cases)
