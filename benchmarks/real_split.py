"""The real-data benchmark's datasets: a seeded, stratified train/test split of a real raw dataset (Emidec labels),
every case cropped to a heart field of view.

The crop is an **oracle crop**: the box of the case's foreground labels plus ``--margin`` millimetres in-plane, all
slices kept, made alike for training and test cases from their reference labels (a deployed model would need a
localiser to find the heart). Cases are stratified by what they hold (normal, infarct only, infarct with no-reflow)
so that train and test have the same mix. The training dataset's cases are split again, stratified, into
- V, nnU-Net's validation cases (``--val-cases``; they decide nnU-Net's postprocessing),
- P, the probe cases (``--probe-cases``), written as a third raw dataset: the short probes that choose the synthesis
  settings are scored on them, never on the test cases,
- G, the rest, on which the lesion generators (sampler and mask generator) are trained,
and ``splits_final.json`` of the training dataset gets fold 0 = (G + P, V), the benchmark's training split
(``--split-fold 0``), and fold 1 = (G, V), the generators' and the probes' (``-f 1``, ``--split-fold 1``). So the
generators never see a validation, probe or test case. The split is recorded in ``split_<train>_<test>.json``.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.real_split SRC
--train-id 202 --test-id 203 --probe-id 204 [--test-fraction 0.3] [--val-cases 5] [--probe-cases 10] [--seed 0]
[--margin 20]`` (writes into
``$nnUNet_raw`` and the splits file into ``$nnUNet_preprocessed``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_lefusion.nnunet.context import training_cases

STRATA = ("normal", "infarct", "no_reflow")


def stratum(label: np.ndarray) -> str:
    """Which of :data:`STRATA` a case's label (Emidec: 3 infarct, 4 no-reflow) belongs to."""
    return "no_reflow" if (label == 4).any() else "infarct" if (label == 3).any() else "normal"


def stratified_split(strata: dict[str, str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(kept, drawn) identifiers: ``round(fraction * n)`` cases of each stratum are drawn with ``seed``."""
    rng = np.random.default_rng([seed, 2024])
    kept, drawn = [], []
    for name in STRATA:
        cases = sorted(c for c, s in strata.items() if s == name)
        chosen = set(rng.choice(cases, size=round(fraction * len(cases)), replace=False)) if cases else set()
        drawn += [c for c in cases if c in chosen]
        kept += [c for c in cases if c not in chosen]
    return sorted(kept), sorted(drawn)


def heart_box(label: np.ndarray, spacing_zyx: tuple[float, float, float], margin_mm: float) -> tuple[slice, ...]:
    """(z, y, x) slices: every slice, and the in-plane box of the foreground labels grown by ``margin_mm``."""
    nonzero = np.nonzero(label)
    box = [slice(0, label.shape[0])]
    for axis in (1, 2):
        pad = int(np.ceil(margin_mm / spacing_zyx[axis]))
        lo, hi = int(nonzero[axis].min()) - pad, int(nonzero[axis].max()) + 1 + pad
        box.append(slice(max(lo, 0), min(hi, label.shape[axis])))
    return tuple(box)


def crop(image: sitk.Image, box: tuple[slice, ...]) -> sitk.Image:
    """``image`` cut to the (z, y, x) ``box``; SimpleITK's slicing keeps the physical position of every voxel."""
    z, y, x = box
    return image[x.start:x.stop, y.start:y.stop, z.start:z.stop]


def write_dataset(target: Path, cases: list[tuple[str, Path, Path]], dataset_json: dict, margin_mm: float) -> None:
    """``cases`` (identifier, image, label) cropped into a new raw dataset at ``target`` (written aside, renamed)."""
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "imagesTr").mkdir(parents=True)
    (scratch / "labelsTr").mkdir()
    ending = dataset_json["file_ending"]
    for ident, image_path, label_path in cases:
        label = sitk.ReadImage(str(label_path))
        box = heart_box(sitk.GetArrayFromImage(label), label.GetSpacing()[::-1], margin_mm)
        sitk.WriteImage(crop(label, box), str(scratch / "labelsTr" / f"{ident}{ending}"))
        for channel in sorted(image_path.parent.glob(f"{ident}_[0-9][0-9][0-9][0-9]{ending}")):
            sitk.WriteImage(crop(sitk.ReadImage(str(channel)), box), str(scratch / "imagesTr" / channel.name))
    description = f"{dataset_json.get('description', '')} Oracle heart crop: label box + {margin_mm:g} mm in-plane."
    (scratch / "dataset.json").write_text(json.dumps({**dataset_json, "name": target.name, "numTraining": len(cases),
                                                      "description": description.strip()}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="raw dataset with Emidec labels (imagesTr, labelsTr, dataset.json)")
    parser.add_argument("--train-id", type=int, default=202)
    parser.add_argument("--test-id", type=int, default=203)
    parser.add_argument("--name", default="EmidecPNG")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--probe-id", type=int, default=204)
    parser.add_argument("--val-cases", type=int, default=5, help="nnU-Net validation cases among the training cases")
    parser.add_argument("--probe-cases", type=int, default=10, help="probe test cases among the training cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=20.0, help="in-plane margin around the labels, mm")
    args = parser.parse_args()
    raw = Path(os.environ["nnUNet_raw"])
    cases = {ident: (ident, image, label) for ident, image, label in training_cases(args.source)}
    strata = {ident: stratum(sitk.GetArrayFromImage(sitk.ReadImage(str(c[2])))) for ident, c in cases.items()}
    train, test = stratified_split(strata, args.test_fraction, args.seed)
    fit, val = stratified_split({c: strata[c] for c in train}, args.val_cases / len(train), args.seed + 1)
    generators, probe = stratified_split({c: strata[c] for c in fit}, args.probe_cases / len(fit), args.seed + 2)
    dataset_json = json.loads((args.source / "dataset.json").read_text())
    names = {}
    for part, ident, chosen in (("train", args.train_id, train), ("test", args.test_id, test),
                                ("probe", args.probe_id, probe)):
        target = raw / f"Dataset{ident:03d}_{args.name}{part.capitalize()}"
        write_dataset(target, [cases[c] for c in chosen], dataset_json, args.margin)
        names[part] = target.name
    splits = Path(os.environ["nnUNet_preprocessed"]) / names["train"] / "splits_final.json"
    splits.parent.mkdir(parents=True, exist_ok=True)
    splits.write_text(json.dumps([{"train": fit, "val": val}, {"train": generators, "val": val}], indent=1))
    record = {"source": str(args.source), "seed": args.seed, "test_fraction": args.test_fraction,
              "margin_mm": args.margin, "datasets": names, "train": train, "test": test, "probe": probe,
              "folds": [{"train": fit, "val": val}, {"train": generators, "val": val}],
              "strata": {part: {s: sum(strata[c] == s for c in chosen) for s in STRATA}
                         for part, chosen in (("generators", generators), ("probe", probe), ("val", val),
                                              ("test", test))}}
    (raw / f"split_{args.train_id:03d}_{args.test_id:03d}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record["strata"]), names)


if __name__ == "__main__":
    main()
