"""What nnU-Net trains on: the lesions of a synthetic cache against the real lesions of the cases it was made from.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.cache_realism --cache CACHE_FOLDER [--channel 0]`` with the
``nnUNet_*`` variables of the dataset (the cache's manifest names the dataset, configuration and training cases;
a benchmark run's cache is ``OUT/runs/<arm>/seed_<k>/cache``, its dataset links ``OUT/nnUNet_preprocessed``).

Both sides are read as nnU-Net loads them (preprocessed, normalised). Per lesion class and per kind of synthetic
case (retexture, newmask, normal) it prints the mean and standard deviation of the lesion intensities, the gap of
the synthetic mean to the real one and the 1-Wasserstein distance between the pooled intensities, both in units of
the real lesion's standard deviation; the organ (healthy tissue) is a reference row. For the innermost lesion it
prints the share of its in-plane neighbours that are healthy organ (``masks.inner_lesion_exposure``: real
no-reflow lies inside the infarct, next to the cavity; mean, median and maximum over cases), each class's share of
the lesion voxels, and how many lesion voxels of the source cases a synthetic case gives another lesion class.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

from nnunet_lefusion.masks import inner_lesion_exposure
from nnunet_lefusion.nnunet.cache import Manifest, recorded_labels
from nnunet_lefusion.nnunet.context import DatasetContext


def load_cases(folder: Path, identifiers: list[str], channel: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image channel, label map) of preprocessed cases, read with nnU-Net's own dataset class."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(str(folder), identifiers)
    cases = []
    for identifier in identifiers:
        data, seg, _, _ = dataset.load_case(identifier)
        cases.append((np.asarray(data[channel]), np.asarray(seg[0])))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, type=Path, help="a cache folder (holding manifest.json)")
    parser.add_argument("--channel", type=int, default=0, help="image channel the lesions were synthesized in")
    args = parser.parse_args()

    manifest = Manifest.load(args.cache)
    ctx = DatasetContext(manifest.dataset, manifest.configuration, manifest.fold, manifest.plans_identifier)
    labels = recorded_labels(manifest, ctx.dataset_json)
    kinds = sorted({info.get("kind", "?") for info in manifest.cases.values()})
    groups = {"real": load_cases(ctx.data_folder, sorted(manifest.training_cases), args.channel)}
    sources = dict(zip(sorted(manifest.training_cases), (seg for _, seg in groups["real"])))
    relabelled = []  # per synthetic case: lesion voxels of its source given another lesion class
    for kind in kinds:
        ids = sorted(i for i, info in manifest.cases.items() if info.get("kind", "?") == kind)
        groups[f"synthetic {kind}"] = load_cases(args.cache, ids, args.channel)
        for identifier, (_, seg) in zip(ids, groups[f"synthetic {kind}"]):
            source = sources.get(manifest.cases[identifier]["source"])
            if source is not None:
                relabelled.append(int((np.isin(source, labels.lesions) & np.isin(seg, labels.lesions)
                                       & (seg != source)).sum()))
    groups["synthetic (all)"] = [case for name in groups if name != "real" for case in groups[name]]

    structures = [(f"organ {labels.organ}", labels.organ)] + [(f"lesion {v}", (v,)) for v in labels.lesions]
    print(f"{ctx.dataset} {ctx.configuration} fold {ctx.fold}: {len(manifest.training_cases)} training cases, "
          f"{len(manifest.cases)} synthetic ({', '.join(kinds)}); channel {args.channel}, preprocessed intensities")
    header = f"{'structure':<14} | {'cases':<22} | {'voxels':>8} | {'mean':>6} | {'s.d.':>5} | gap/s.d. | W1/s.d."
    print(header + "\n" + "-" * len(header))
    gaps = {}
    for name, values in structures:
        pooled = {group: np.concatenate([image[np.isin(seg, values)] for image, seg in cases] or [np.zeros(0)])
                  for group, cases in groups.items()}
        real = pooled["real"]
        for group, sample in pooled.items():
            if not sample.size:
                continue
            gap = (sample.mean() - real.mean()) / real.std()
            w1 = wasserstein_distance(sample, real) / real.std()
            gaps[(name, group)] = (gap, w1)
            print(f"{name:<14} | {group:<22} | {sample.size:>8} | {sample.mean():>6.2f} | {sample.std():>5.2f} | "
                  f"{gap:>+8.2f} | {w1:>7.2f}")
    inner = labels.lesions[-1]
    print(f"\nlesion {inner} (innermost): share of its in-plane neighbours that are healthy organ (mean / median / "
          f"max over cases with it); lesion-voxel share per class")
    exposure = {}
    for group, cases in groups.items():
        shares = [e for e in (inner_lesion_exposure(seg, labels) for _, seg in cases) if e is not None]
        counts = {v: sum(int((seg == v).sum()) for _, seg in cases) for v in labels.lesions}
        total = max(sum(counts.values()), 1)
        exposure[group] = float(np.mean(shares)) if shares else float("nan")
        spread = f"{np.median(shares):.3f} / {max(shares):.3f}" if shares else "- / -"
        print(f"  {group:<22} exposure {exposure[group]:.3f} / {spread} ({len(shares)} cases); shares "
              + ", ".join(f"{v}: {counts[v] / total:.1%}" for v in labels.lesions))
    gap, w1 = gaps.get((f"lesion {inner}", "synthetic (all)"), (float("nan"), float("nan")))
    print(f"lesion {inner}, synthetic vs real: mean gap {gap:+.2f} s.d., W1 {w1:.2f} s.d., healthy-organ exposure "
          f"{exposure['synthetic (all)']:.3f} vs {exposure['real']:.3f}")
    print(f"source lesion voxels given another lesion class (0 for copy-paste and retexture): {sum(relabelled)}, "
          f"in {np.count_nonzero(relabelled)} of {len(relabelled)} synthetic cases")


if __name__ == "__main__":
    main()
