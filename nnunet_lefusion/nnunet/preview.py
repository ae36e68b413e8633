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


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def organ_box(planes: list[np.ndarray], labels: LesionLabels, margin: float = 0.25,
              min_margin: int = 8) -> tuple[slice, slice]:
    """The in-plane box that holds the organ and its lesions on every given label plane, widened on each side by
    ``margin`` times its larger side (at least ``min_margin`` pixels) and clipped to the plane; the whole plane when
    no plane shows the organ."""
    host = np.any([np.isin(plane, labels.host) for plane in planes], axis=0)
    if not host.any():
        return slice(0, host.shape[0]), slice(0, host.shape[1])
    rows, cols = np.nonzero(host.any(axis=1))[0], np.nonzero(host.any(axis=0))[0]
    pad = max(min_margin, int(round(margin * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))))
    return (slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, host.shape[0])),
            slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, host.shape[1])))


def preview_figure(panels: list[tuple[np.ndarray, np.ndarray, str]], labels: LesionLabels):
    """A figure with one panel per (image plane, label plane, title), all cropped to the organ's box (see
    ``organ_box``) so that a lesion of a few dozen pixels stays visible on a large field of view; axes are in the
    plane's pixel coordinates. Lesion outlines in yellow, red, cyan, magenta (outer to inner class)."""
    plt = _pyplot()
    rows, cols = organ_box([label for _, label, _ in panels], labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    for ax, (image, label, title) in zip(axes[0], panels):
        plane = np.asarray(image, dtype=np.float32)[rows, cols]
        low, high = np.percentile(plane, [0.5, 99.5])
        extent = (cols.start - 0.5, cols.stop - 0.5, rows.stop - 0.5, rows.start - 0.5)
        ax.imshow(plane, cmap="gray", vmin=low, vmax=high, interpolation="nearest", extent=extent)
        for value, colour in zip(labels.lesions, ("yellow", "red", "cyan", "magenta")):
            mask = np.asarray(label)[rows, cols] == value
            if mask.any():
                ax.contour(np.arange(cols.start, cols.stop), np.arange(rows.start, rows.stop), mask, levels=[0.5],
                           colors=colour, linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_previews(ctx: DatasetContext, folder: Path, labels: LesionLabels, out: Path, limit: int | None = None) -> int:
    """One PNG per synthetic case: its source case and the synthetic case at the slice with the most synthetic
    lesion, zoomed on the organ, lesion outlines drawn (first channel, nnU-Net's preprocessed grid). Returns the
    number written."""
    plt = _pyplot()

    manifest = Manifest.load(folder)
    real_cases, synthetic_cases = _datasets(ctx, folder, manifest)
    out.mkdir(parents=True, exist_ok=True)
    chosen = sorted(manifest.cases)[:limit]
    for identifier in tqdm(chosen, desc="previews", unit="case"):
        info = manifest.cases[identifier]
        data, seg = synthetic_cases.load_case(identifier)[:2]
        real_data, real_seg = real_cases.load_case(info["source"])[:2]
        z = _lesion_slice(np.asarray(seg[0]), labels.lesions)
        fig = preview_figure([(real_data[0][z], real_seg[0][z], f"real {info['source']}"),
                              (data[0][z], seg[0][z], f"{identifier} ({info.get('kind', info.get('method'))})")],
                             labels)
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
