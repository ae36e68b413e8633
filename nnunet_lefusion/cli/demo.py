"""``nnUNetv2_lefusion_demo``: the whole pipeline on a small phantom, with real nnU-Net commands, on CPU or GPU.

phantom -> nnUNetv2_plan_and_preprocess -> nnUNetv2_lefusion_synthesize (LeFusion with the shipped sampler and
mask generator: re-textured, new-mask and normal-case kinds, with preview pictures; or copy-paste) -> nnUNetv2_train
-tr nnUNetTrainerLeFusion_short -> nnUNetv2_predict. Everything lives in its own work folder (its own nnUNet_raw,
nnUNet_preprocessed and nnUNet_results), so the user's nnU-Net folders are never touched.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_lefusion.cli.common import add_device_argument, check_device, cli_main
from nnunet_lefusion.config import ENV_VARIABLES, TrainerSettings, write_settings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.preprocess import planning_env

DATASET_ID = 990
PHANTOM_SEED = 5  # a phantom none of the shipped models was trained on (they refuse their own training cases)
LEFUSION_MIX = "retexture=0.5,newmask=0.25,normal=0.25"


def _run(step: str, cmd: list[str], env: dict[str, str]) -> None:
    tool = Path(sys.executable).parent / cmd[0]
    start = time.time()
    print(f"\n=== {step}: {' '.join(cmd)}", flush=True)
    result = subprocess.run([str(tool) if tool.exists() else cmd[0], *cmd[1:]], env=env)
    if result.returncode != 0:
        raise LeFusionError(f"demo step '{step}' failed (exit {result.returncode}): {' '.join(cmd)}")
    print(f"=== {step} done in {time.time() - start:.1f} s", flush=True)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="lefusion_demo",
                        help="folder for all demo data (default ./lefusion_demo)")
    parser.add_argument("-n", dest="num_cases", type=int, default=12, help="phantom cases (default 12)")
    parser.add_argument("-c", dest="configuration", default="3d_fullres", choices=("2d", "3d_fullres"),
                        help="nnU-Net configuration (default 3d_fullres)")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations (default 20)")
    parser.add_argument("--rate", type=float, default=0.5, help="synthetic rate (default 0.5)")
    parser.add_argument("--method", choices=("lefusion", "copypaste"), default="lefusion",
                        help="synthesis: lefusion (the shipped sampler and mask generator, default) or copypaste")
    parser.add_argument("--synthetic", type=int, default=8, help="synthetic cases to make (default 8)")
    add_device_argument(parser, nnunet=True)
    args = parser.parse_args(argv)
    device = check_device(args.device, nnunet=True)
    if args.num_cases < 5:
        raise LeFusionError(f"-n {args.num_cases}: nnU-Net's 5-fold split needs at least 5 cases")
    if args.iterations < 1 or args.synthetic < 1 or not 0.0 <= args.rate <= 1.0:
        raise LeFusionError(f"need --iterations >= 1, --synthetic >= 1 and 0 <= --rate <= 1, got {args.iterations}, "
                            f"{args.synthetic} and {args.rate}")
    if Path(args.work_dir).exists() and not Path(args.work_dir).is_dir():
        raise LeFusionError(f"--work-dir {args.work_dir} exists and is not a folder")

    work = Path(args.work_dir).resolve()
    settings = write_settings(TrainerSettings(rate=args.rate, epochs=1, iterations=args.iterations, val_iterations=2),
                              work / "lefusion.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}   # the flags above are the settings
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), LEFUSION_CONFIG=str(settings))
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    cfg, trainer = args.configuration, "nnUNetTrainerLeFusion_short"
    ds = str(DATASET_ID)
    _run("phantom", ["nnUNetv2_lefusion_phantom", "-d", ds, "-n", str(args.num_cases), "--fov", "heart",
                     "--seed", str(PHANTOM_SEED), "--overwrite"], env)
    _run("plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", ds, "-c", cfg, "-np", "2", "-npfp", "2"],
         planning_env(env))
    preview = work / "preview"
    synthesize = ["nnUNetv2_lefusion_synthesize", "-d", ds, "-c", cfg, "-f", "0", "--method", args.method,
                  "-n", str(args.synthetic), "--overwrite", "--preview", str(preview)]
    if args.method == "lefusion":
        synthesize += ["--mix", LEFUSION_MIX, "-device", device]
    _run(f"synthesize ({args.method})", synthesize, env)
    _run("register trainers", ["nnUNetv2_lefusion_register"], env)
    _run("train", ["nnUNetv2_train", ds, cfg, "0", "-tr", trainer, "-device", device], env)
    results = next((work / "nnUNet_results").glob(f"Dataset{DATASET_ID:03d}_*")) / f"{trainer}__nnUNetPlans__{cfg}"
    raw = next((work / "nnUNet_raw").glob(f"Dataset{DATASET_ID:03d}_*"))
    pred = work / "predictions"
    _run("predict", ["nnUNetv2_predict", "-i", str(raw / "imagesTr"), "-o", str(pred), "-d", ds, "-c", cfg,
                     "-f", "0", "-tr", trainer, "-device", device, "--disable_tta"], env)
    stats = json.loads((results / "fold_0" / "lefusion_stats.json").read_text())
    summary = json.loads((results / "fold_0" / "validation" / "summary.json").read_text())
    cache = next((work / "nnUNet_preprocessed").glob(f"Dataset{DATASET_ID:03d}_*/lefusion_cache/*/fold_0"), None)
    print("\n".join(summary_lines(stats, summary, args.iterations, args.rate, preview, pred, results, cache)))


def summary_lines(stats: dict, validation: dict, iterations: int, rate: float, preview: Path, predictions: Path,
                  model: Path, cache: Path | None) -> list[str]:
    """The demo's closing words: what the user got, where it is, and what the short run's figures mean."""
    dice = ", ".join(f"label {k} {v['Dice']:.3f}" for k, v in validation["mean"].items())
    return [
        "",
        "=== demo finished: the whole pipeline ran (phantom -> plan/preprocess -> synthesis -> nnU-Net training with "
        "synthetic cases -> prediction)",
        f"  synthetic cases (nnU-Net's preprocessed format, manifest.json): {cache if cache else 'not found'}",
        f"  preview pictures, one per synthetic case (real source | synthetic slice, lesion outlines): {preview}",
        f"  predictions of the trained model: {predictions}",
        f"  trained model and its training log: {model}",
        f"  the trainer loaded {stats['total_synthetic']} synthetic cases of {stats['total_loads']} "
        f"(synthetic rate {rate})",
        f"  validation Dice after {iterations} training iterations: {dice}",
        f"Dice near 0 is expected after {iterations} iterations (nnU-Net trains for 250,000): this checks the "
        "pipeline, not accuracy. Look at the preview pictures to see the synthetic lesions; see README.md "
        "'Use it on your own data' for a real training.",
    ]
