"""Sim-to-real: how well nnU-Net trained on phantom cases only segments real DE-MRI, and the intensity statistics
that explain it.

nnU-Net 2d is trained on heart-FOV phantom cases (``-n`` cases, fold 0: 80 % train, the rest its in-domain
validation; the control trainer ``nnUNetTrainerLeFusion_r000_short`` for ``--epochs`` x ``--iterations``), then
predicts the real cases of a raw dataset (Emidec labels) cropped to a heart field of view: the box of the reference
labels plus ``--margin`` voxels in-plane, all slices (an oracle crop). It prints the intensity statistics of phantom
and real crops (``nnunet_lefusion.realism.crop_statistics``: each tissue's median as a percentile of its crop, the
crop's 5th/95th percentiles over healthy myocardium's median, each tissue's contrast to healthy myocardium), then
per-case-mean Dice of cavity (1), myocardium (2) and infarct (3+4, cases that have one), in domain and on the real
cases, headline last. ``--png`` shows phantom and real crops side by side and a prediction on a real case.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.sim_to_real --real RAW [-n 75] [--seed 0]
[--epochs 10] [--iterations 50] [--batch-size B] [--every K] [--work-dir work_runs/sim_to_real] [--png PNG]
[--stats-only] [--reuse]``. Without ``--reuse`` the phantom in ``--work-dir`` is made afresh; the model always is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from benchmarks.common import BIN  # noqa: E402
from benchmarks.real_split import crop  # noqa: E402
from nnunet_lefusion.nnunet.context import training_cases  # noqa: E402
from nnunet_lefusion.nnunet.preprocess import planning_env  # noqa: E402
from nnunet_lefusion.phantom import write_dataset  # noqa: E402
from nnunet_lefusion.realism import (CROP_MARGIN, EMIDEC_CROP, EMIDEC_LESION_EXTENT, crop_statistics,  # noqa: E402
                                     heart_crop, lesion_extent)

DATASET_ID = 961
TRAINER = "nnUNetTrainerLeFusion_r000_short"
DICE = {"cavity": (1,), "myocardium": (2,), "infarct (3+4)": (3, 4)}


def dice(prediction: np.ndarray, reference: np.ndarray, values: tuple[int, ...]) -> float:
    """Dice of the union of ``values``; NaN where the reference has none of them."""
    p, r = np.isin(prediction, values), np.isin(reference, values)
    return 2.0 * (p & r).sum() / (p.sum() + r.sum()) if r.any() else math.nan


def _run(cmd: list[str], env: dict, log: Path) -> None:
    with log.open("a") as out:
        subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, check=True, stdout=out, stderr=subprocess.STDOUT)


def train_on_phantom(work: Path, args: argparse.Namespace, env: dict) -> None:
    """Write the phantom (heart FOV) and plan and preprocess it for 2d (unless ``--reuse``), then train fold 0 (its
    validation: in domain) at ``--batch-size``."""
    log = work / "nnunet.log"
    shutil.rmtree(work / "nnUNet_results", ignore_errors=True)
    if not args.reuse:
        shutil.rmtree(work / "nnUNet_preprocessed", ignore_errors=True)
        write_dataset(DATASET_ID, args.num_cases, args.seed, work / "nnUNet_raw", fov="heart", overwrite=True)
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "2", "-npfp", "2"],
             planning_env(env), log)
    if args.batch_size:
        plans_file = next((work / "nnUNet_preprocessed").glob("Dataset*")) / "nnUNetPlans.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"]["2d"]["batch_size"] = args.batch_size
        plans_file.write_text(json.dumps(plans, indent=1))
    train_env = {**env, "LEFUSION_EPOCHS": str(args.epochs), "LEFUSION_ITERS": str(args.iterations),
                 "LEFUSION_VAL_ITERS": "2"}
    _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], train_env, log)


def write_real_crops(real: Path, out: Path, margin: int, every: int) -> list[str]:
    """Crop every ``every``-th real case to the heart FOV into ``out``/images (``_0000``) and ``out``/labels; their
    identifiers."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    names = []
    for ident, image_path, label_path in training_cases(real)[::every]:
        label = sitk.ReadImage(str(label_path))
        box = heart_crop(sitk.GetArrayFromImage(label), margin)
        sitk.WriteImage(crop(label, box), str(out / "labels" / f"{ident}.nii.gz"))
        sitk.WriteImage(sitk.Cast(crop(sitk.ReadImage(str(image_path)), box), sitk.sitkFloat32),
                        str(out / "images" / f"{ident}_0000.nii.gz"))
        names.append(ident)
    return names


def phantom_crops(root: Path, dataset_id: int, margin: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A phantom dataset's cases under raw folder ``root``, cropped like the real ones."""
    raw = next(root.glob(f"Dataset{dataset_id:03d}_*"))
    cases = []
    for ident, image_path, label_path in training_cases(raw):
        image, label = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (image_path, label_path))
        box = heart_crop(label, margin)
        cases.append((ident, image[box].astype(np.float32), label[box]))
    return cases


def summarise(rows: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    """Median over the cases of each key (cases without it left out)."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        out[key] = float(np.median(values)) if values else math.nan
    return out


def has_lesion(label: np.ndarray) -> bool:
    """Whether an Emidec label map holds infarct or no-reflow."""
    return bool((label >= 3).any())


def two_of_each(cases: list) -> list:
    """The first two normal cases and the first two with a lesion."""
    return ([case for case in cases if not has_lesion(case[2])][:2]
            + [case for case in cases if has_lesion(case[2])][:2])


def median_lesion_case(real: list, predictions: dict) -> tuple:
    """The real case with a lesion whose infarct (3+4) Dice is the median one: a typical prediction, not the best."""
    scored = sorted((dice(predictions[name], label, DICE["infarct (3+4)"]), name) for name, _, label in real
                    if has_lesion(label))
    chosen = scored[len(scored) // 2][1]
    return next(case for case in real if case[0] == chosen)


def write_picture(phantom: list, real: list, predictions: dict, path: Path) -> None:
    """Row 1: phantom crops; row 2: real crops (two normal, two with a lesion); row 3: the real case of median
    infarct Dice, its reference and the prediction."""
    def mid(label: np.ndarray) -> int:
        lesion = np.isin(label, (3, 4)).sum(axis=(1, 2))
        return int(np.argmax(lesion if lesion.any() else (label > 0).sum(axis=(1, 2))))

    fig, axes = plt.subplots(3, 4, figsize=(10, 7.8))
    for kind, row, cases in zip(("phantom", "real"), axes[:2], (two_of_each(phantom), two_of_each(real))):
        for ax, (name, image, label) in zip(row, cases):
            z = mid(label)
            ax.imshow(image[z], cmap="gray", interpolation="nearest")
            ax.set_title(f"{kind} {name}", fontsize=8)
    name, image, label = median_lesion_case(real, predictions)
    z = mid(label)
    axes[2][0].imshow(image[z], cmap="gray", interpolation="nearest")
    axes[2][0].set_title(f"real {name} slice {z}", fontsize=8)
    for ax, (title, lab) in zip(axes[2][1:3], (("reference", label), ("prediction (phantom-trained)",
                                                                       predictions[name]))):
        ax.imshow(image[z], cmap="gray", interpolation="nearest")
        for value, colour in ((1, "tab:blue"), (2, "tab:green"), (3, "yellow"), (4, "red")):
            if (lab[z] == value).any():
                ax.contour(lab[z] == value, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(title, fontsize=8)
    axes[2][3].set_visible(False)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def predict(images: Path, out: Path, env: dict, log: Path) -> dict[str, np.ndarray]:
    """The phantom-trained model's label maps for the ``_0000`` images in ``images``, by case identifier."""
    shutil.rmtree(out, ignore_errors=True)
    _run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(DATASET_ID), "-c", "2d", "-f", "0",
          "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env, log)
    return {p.name[:-len(".nii.gz")]: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in out.glob("*.nii.gz")}


def report_dice(title: str, cases: list, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Print and return the per-case-mean Dice of each structure over the cases that have it."""
    print(title)
    means = {}
    for key, values in DICE.items():
        scores = [dice(predictions[n], lab, values) for n, _, lab in cases]
        finite = [v for v in scores if math.isfinite(v)]
        means[key] = float(np.mean(finite)) if finite else math.nan
        print(f"  {key:15s} {means[key]:.3f}  ({len(finite)} cases)")
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, required=True, help="real raw dataset with Emidec labels")
    parser.add_argument("-n", dest="num_cases", type=int, default=75,
                        help="phantom cases (default 75: fold 0 trains on 60, validates on 15)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch (default 50)")
    parser.add_argument("--margin", type=int, default=CROP_MARGIN,
                        help=f"in-plane crop margin, voxels (default {CROP_MARGIN})")
    parser.add_argument("--every", type=int, default=1, help="use every k-th real case (default 1: all)")
    parser.add_argument("--work-dir", type=Path, default=Path("work_runs/sim_to_real"))
    parser.add_argument("--png", type=Path, default=None, help="phantom/real crops and a prediction")
    parser.add_argument("--stats-only", action="store_true", help="intensity statistics only, no training")
    parser.add_argument("--batch-size", type=int, default=None, help="override nnU-Net's planned 2d batch size")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the phantom and its preprocessed data in --work-dir (train again)")
    args = parser.parse_args()

    work = args.work_dir.resolve()
    env = {**os.environ, **{k: str(work / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    env.setdefault("nnUNet_n_proc_DA", "2")
    (work / "nnUNet_raw").mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.stats_only:
        write_dataset(DATASET_ID, args.num_cases, args.seed, work / "nnUNet_raw", fov="heart", overwrite=True)
    else:
        train_on_phantom(work, args, env)
    trained = time.time()
    names = write_real_crops(args.real, work / "real_crops", args.margin, args.every)
    real = [(n, sitk.GetArrayFromImage(sitk.ReadImage(str(work / "real_crops" / "images" / f"{n}_0000.nii.gz"))),
             sitk.GetArrayFromImage(sitk.ReadImage(str(work / "real_crops" / "labels" / f"{n}.nii.gz"))))
            for n in names]
    phantom = phantom_crops(work / "nnUNet_raw", DATASET_ID, args.margin)

    print(f"\nintensity statistics of heart crops (label box + {args.margin} voxels), median over cases; "
          "pct: tissue median as a percentile of its crop; contrast: (median - healthy myocardium median) / its sd")
    print(f"{'statistic':22s} {'phantom':>9s} {'real':>9s}")
    ph, re = (summarise([crop_statistics(i, lab) for _, i, lab in cases], list(EMIDEC_CROP))
              for cases in (phantom, real))
    for key in EMIDEC_CROP:
        print(f"{key:22s} {ph[key]:9.2f} {re[key]:9.2f}")
    gaps = {k: abs(ph[k] - re[k]) for k in EMIDEC_CROP if k.startswith("contrast_")}
    print("contrast medians within 0.4 of the real ones: " + ", ".join(
        f"{k[len('contrast_'):]} {'yes' if v <= 0.4 else 'NO'} ({v:.2f})" for k, v in gaps.items()))
    print("lesion extent, median over the cases with a lesion (no-reflow/wall: over those with no-reflow):")
    ph, re = (summarise([lesion_extent(lab) for _, _, lab in cases if has_lesion(lab)], list(EMIDEC_LESION_EXTENT))
              for cases in (phantom, real))
    for key in EMIDEC_LESION_EXTENT:
        print(f"{key:22s} {ph[key]:9.3f} {re[key]:9.3f}")
    if args.stats_only:
        return

    log = work / "nnunet.log"
    results = next((work / "nnUNet_results").glob("Dataset*"))
    validation = results / f"{TRAINER}__nnUNetPlans__2d" / "fold_0" / "validation"
    in_domain = [case for case in phantom_crops(work / "nnUNet_raw", DATASET_ID, margin=10 ** 6)
                 if (validation / f"{case[0]}.nii.gz").is_file()]
    report_dice(f"\nin domain: nnU-Net's fold-0 validation, {len(in_domain)} phantom cases:", in_domain,
                {n: sitk.GetArrayFromImage(sitk.ReadImage(str(validation / f"{n}.nii.gz"))) for n, _, _ in in_domain})
    predictions = predict(work / "real_crops" / "images", work / "predictions", env, log)
    if args.png:
        write_picture(phantom, real, predictions, args.png)
    batch = args.batch_size or "as planned"
    scores = report_dice(f"\nnnU-Net 2d trained on {args.num_cases} phantom cases (seed {args.seed}, heart FOV, "
                         f"{args.epochs} x {args.iterations} iterations, batch {batch}, {trained - start:.0f} s), "
                         f"predicting {len(real)} real cases of {args.real.name} (oracle heart crop), mean Dice over "
                         "the cases that have the structure:", real, predictions)
    print("sim-to-real Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
