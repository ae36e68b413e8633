"""Phantom realism: Emidec intensity statistics of phantom cases (or of any nnU-Net raw dataset), with a picture.

For every case it measures the remote myocardium's level and noise, the CNR of blood pool, infarct and no-reflow
against it, the infarct's heterogeneity and the width of its border (``nnunet_lefusion.realism``), then prints
each statistic over the cases with its Emidec target range and whether the range holds (every case, or the median
for the texture measures). It writes a PNG montage: whole slice, heart zoom, zoom with label outlines.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.phantom_realism [-n 50] [--seed 0] [--fov thorax]
[--png benchmarks/results/phantom_realism.png]``; ``--raw $nnUNet_raw/DatasetXXX_Name`` measures that dataset
instead (labels from its dataset.json), so the phantom can be set beside real data.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nnunet_lefusion.nnunet.context import training_cases  # noqa: E402
from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels  # noqa: E402
from nnunet_lefusion.phantom import FOVS, case_plan, case_rng, generate_case  # noqa: E402
from nnunet_lefusion.realism import TARGETS, case_statistics  # noqa: E402
from nnunet_lefusion.training.roi_data import read_volume  # noqa: E402

Case = tuple[str, np.ndarray, np.ndarray, tuple[float, float, float]]   # name, image, label, spacing (z, y, x)


def phantom_cases(num_cases: int, seed: int, fov: str) -> Iterator[Case]:
    """Fresh phantom cases, as ``nnUNetv2_lefusion_phantom`` would write them."""
    for name, pathological in case_plan(num_cases):
        case = generate_case(case_rng(seed, name), pathological, fov)
        yield name, case.image, case.label, case.spacing


def raw_cases(folder: Path, limit: int) -> Iterator[Case]:
    """The first ``limit`` training cases of an nnU-Net raw dataset (first channel)."""
    for identifier, image_file, label_file in training_cases(folder)[:limit]:
        image, header = read_volume(image_file)
        yield identifier, image.astype(np.float32), read_volume(label_file)[0], header.GetSpacing()[::-1]


def montage_slice(label: np.ndarray, lesions: tuple[int, ...]) -> int:
    """The slice with the most lesion (else the most heart) voxels."""
    counts = np.isin(label, lesions).sum(axis=(1, 2))
    return int(np.argmax(counts if counts.any() else (label > 0).sum(axis=(1, 2))))


def write_montage(cases: list[Case], roles: LesionLabels, path: Path) -> None:
    """Rows of cases; columns: whole slice, heart zoom, zoom with label outlines."""
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    colours = {roles.cavity: "tab:blue", **{o: "tab:green" for o in roles.organ},
               roles.lesions[0]: "yellow", **({roles.lesions[1]: "red"} if len(roles.lesions) > 1 else {})}
    for row, (name, image, label, _) in zip(axes, cases):
        z = montage_slice(label, roles.lesions)
        rows, cols = np.nonzero(label[z] > 0)
        margin = 12
        box = np.s_[max(rows.min() - margin, 0):rows.max() + margin, max(cols.min() - margin, 0):cols.max() + margin]
        low, high = np.percentile(image[z], [0.5, 99.5])
        for ax, (picture, title) in zip(row, ((image[z], f"{name} slice {z}"), (image[z][box], "heart"),
                                              (image[z][box], "labels"))):
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        for value, colour in colours.items():
            if value is not None and (label[z][box] == value).any():
                row[2].contour(label[z][box] == value, levels=[0.5], colors=colour, linewidths=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", dest="num_cases", type=int, default=50, help="cases to measure (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--fov", choices=FOVS, default="thorax", help="phantom field of view (default thorax)")
    parser.add_argument("--raw", type=Path, help="measure this nnU-Net raw dataset instead of fresh phantom cases")
    parser.add_argument("--png", type=Path, default=Path("phantom_realism.png"), help="montage to write")
    parser.add_argument("--montage-cases", type=int, default=4, help="cases in the montage (default 4)")
    args = parser.parse_args()

    if args.raw:
        roles = resolve_lesion_labels(json.loads((args.raw / "dataset.json").read_text()))
        source, cases = args.raw.name, raw_cases(args.raw, args.num_cases)
    else:
        roles = LesionLabels.emidec()
        source, cases = f"phantom seed {args.seed}, {args.fov} FOV", phantom_cases(args.num_cases, args.seed, args.fov)
    start = time.time()
    rows, pictures = [], []
    for case in tqdm(cases, total=args.num_cases, desc="measuring", unit="case"):
        rows.append(case_statistics(case[1], case[2], case[3], roles))
        lesion = np.isin(case[2], roles.lesions).any()
        if len(pictures) < args.montage_cases and (lesion or len(pictures) == args.montage_cases - 1):
            pictures.append(case)
    write_montage(pictures, roles, args.png)

    print(f"\n{len(rows)} cases ({source}), {time.time() - start:.0f} s; CNR = (median - median of remote "
          "myocardium) / its sd")
    print(f"{'statistic':25s} {'target':>13s} {'judged on':>9s} {'cases':>5s} {'min':>7s} {'median':>7s} "
          f"{'max':>7s} {'in range':>8s}  holds")
    verdicts = {}
    for target in TARGETS:
        values = [r[target.key] for r in rows]
        finite = np.array([v for v in values if math.isfinite(v)])
        verdicts[target.key] = target.holds_for(values)
        span = f"[{target.low:g}, {target.high:g}]"
        if finite.size:
            figures = f"{finite.min():7.3f} {np.median(finite):7.3f} {finite.max():7.3f}"
        else:
            figures = f"{'-':>7s} {'-':>7s} {'-':>7s}"
        verdict = {True: "yes", False: "NO", None: "n/a (no case has the tissue)"}[verdicts[target.key]]
        print(f"{target.key:25s} {span:>13s} {'each' if target.per_case else 'median':>9s} {finite.size:5d} "
              f"{figures} {sum(map(target.holds, finite)):4d}/{finite.size:<3d}  {verdict}")
    print(f"montage: {args.png}")
    measured = [v for v in verdicts.values() if v is not None]
    print(f"targets held: {sum(measured)}/{len(measured)} measurable on {len(rows)} cases ({source})")


if __name__ == "__main__":
    main()
