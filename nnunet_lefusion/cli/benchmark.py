"""``nnUNetv2_lefusion_benchmark``: nnU-Net segmentation with and without synthetic lesion cases, with error bars.

Per arm and seed: the seed's draw of training cases (the same for every arm), the arm's synthetic cache made from
those cases only, nnU-Net trained through the LeFusion trainer (the real-only arm is nnUNetTrainerLeFusion_r000,
the same code path at rate 0), nnU-Net's predictor on a test set no generator or model has seen (default: a
held-out phantom made with another seed; --cv: each fold's validation cases), and per-case Dice, HD95 and
lesion-wise detection. Re-running the command resumes: finished runs are skipped, an interrupted one restarts.
``-num_parts N -part_id k`` splits the runs as nnUNetv2_predict splits its cases, for N GPUs or machines sharing
OUT (on a small CPU one process at a time is faster); the last part to finish writes the summary.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from nnunet_lefusion.benchmark.metrics import structures
from nnunet_lefusion.benchmark.plan import (ARMS, DEFAULT_RARE_SHARE, PRESETS, estimate_seconds, parse_arms,
                                            run_list)
from nnunet_lefusion.benchmark.report import run_cell, run_name, run_times, write_outputs
from nnunet_lefusion.benchmark.runner import Run, Setup, check_finished_runs, execute_part, prepare
from nnunet_lefusion.benchmark.step_time import step_seconds
from nnunet_lefusion.cli.common import add_device_argument, add_parts_arguments, check_device, cli_main
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels
from nnunet_lefusion.nnunet.context import DatasetContext, check_parts, dataset_name, env_folder, part_of
from nnunet_lefusion.precision import cpu_has_native_bf16
from nnunet_lefusion.pretrained import default_generator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", dest="dataset", required=True, help="training dataset (name or id), preprocessed")
    parser.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-o", dest="output", required=True, help="output folder (resumable)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu",
                        help="; ".join(f"{p.name}: {p.describe}, {p.schedule}" for p in PRESETS.values())
                        + " (default cpu)")
    parser.add_argument("--arms", help=f"comma-separated arms among {', '.join(ARMS)} (default: the preset's)")
    parser.add_argument("--seeds", type=int, help="seeds (= training-case draws; --cv: folds) (default: preset's)")
    parser.add_argument("--train-cases", type=int, help="training cases drawn per seed (default: the preset's)")
    test = parser.add_mutually_exclusive_group()
    test.add_argument("--test-dataset", help="raw test dataset (name or id) never used for training anything")
    test.add_argument("--cv", action="store_true", help="test on each fold's validation cases instead")
    parser.add_argument("--split-fold", type=int,
                        help="every seed trains and validates on this fold of the dataset's own splits_final.json "
                             "(e.g. one whose training cases the generators were trained on), instead of a seeded draw")
    parser.add_argument("--epochs", type=int, help="training epochs per run (default: the preset's)")
    parser.add_argument("--iterations", type=int, help="training iterations per epoch (default: the preset's)")
    parser.add_argument("--rate", type=float, default=0.5, help="synthetic rate of the synthesis arms (default 0.5)")
    parser.add_argument("--sampler", help="LeFusion sampler checkpoint for the lefusion arms (default: the shipped "
                                          "pretrained/lefusion_sampler_phantom.pt where the labels fit it)")
    parser.add_argument("--mask-generator", default=None,
                        help="new lesion masks for lefusion_masks: 'rule' or a checkpoint (default: the shipped "
                             "learned generator for Emidec-like labels, else 'rule')")
    parser.add_argument("--target-share", default=None,
                        help="copypaste and lefusion_masks: wanted share of the rarest lesion label among synthetic "
                             f"lesion voxels (default <innermost lesion label>={DEFAULT_RARE_SHARE})")
    add_device_argument(parser, nnunet=True)
    add_parts_arguments(parser, "the runs", "every run, and the part that finishes last writes the summary")
    return parser


def generator_args(args: argparse.Namespace, arms: tuple[str, ...], roles: LesionLabels, device: str) -> dict:
    """synthesize flags of every synthesis arm, checked before anything runs (default sampler and mask generator:
    the shipped ones where the labels fit them; the rule-based masks otherwise). The arms that rebalance the rarest
    lesion class (copypaste, lefusion_masks) get one and the same ``--target-share``."""
    from nnunet_lefusion.nnunet.generators import SynthesizerOptions, check_generator_files

    if args.sampler and not any(ARMS[n].method == "lefusion" for n in arms):
        raise LeFusionError(f"--sampler is used by the lefusion arms only, and none of {', '.join(arms)} is one")
    if args.mask_generator and not any(ARMS[n].new_masks for n in arms):
        raise LeFusionError(f"--mask-generator is used by the lefusion_masks arm only, which is not among "
                            f"{', '.join(arms)}")
    if args.target_share and not any(ARMS[n].rare_share for n in arms):
        raise LeFusionError(f"--target-share is used by the copypaste and lefusion_masks arms only, and none of "
                            f"{', '.join(arms)} is one")
    share = args.target_share or f"{roles.lesions[-1]}={DEFAULT_RARE_SHARE}"
    flags = {}
    for name in arms:
        arm = ARMS[name]
        flags[name] = ["--target-share", share] if arm.rare_share else []
        if arm.method != "lefusion":
            continue
        sampler = args.sampler or default_generator("sampler", roles, "--sampler")
        if not Path(sampler).is_file():
            raise LeFusionError(f"arm {name} needs a sampler checkpoint: --sampler {sampler} not found")
        check_generator_files("lefusion", SynthesizerOptions(sampler), roles)
        flags[name] += ["--checkpoint", sampler, "--mix", arm.mix, "-device", device]
        if arm.new_masks:
            try:
                masks = args.mask_generator or default_generator("mask generator", roles)
            except LeFusionError:  # labels the shipped generator does not know: rule-based masks
                masks = "rule"
            check_generator_files("lefusion", SynthesizerOptions(sampler, mask_generator=masks), roles)
            flags[name] += ["--mask-generator", masks]
    return flags


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset].with_schedule(args.epochs, args.iterations)
    arms = parse_arms(args.arms, preset)
    seeds = args.seeds if args.seeds is not None else preset.seeds
    train_cases = args.train_cases if args.train_cases is not None else preset.train_cases
    if args.split_fold is not None:
        train_cases = None
    if seeds < 1 or (train_cases is not None and train_cases < 1) or not 0.0 < args.rate <= 1.0:
        raise LeFusionError("need --seeds >= 1, --train-cases >= 1 and 0 < --rate <= 1")
    device = check_device(args.device, nnunet=True)
    check_parts(args.num_parts, args.part_id)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env_folder(name)
    ctx = DatasetContext(args.dataset, args.configuration, 0, args.plans)
    if args.split_fold is not None and (args.cv or args.train_cases is not None):
        raise LeFusionError("--split-fold takes the fold's own training cases: not with --cv or --train-cases")
    if args.cv and seeds > 5:
        raise LeFusionError("--cv runs nnU-Net's 5 folds at most: --seeds <= 5")
    roles = resolve_lesion_labels(ctx.dataset_json)
    names = {v: k for k, v in ctx.dataset_json["labels"].items() if isinstance(v, int)}
    scored = structures(roles, names)
    test_raw = None
    if args.test_dataset:
        test_raw = env_folder("nnUNet_raw") / dataset_name(args.test_dataset)
        if test_raw.name == ctx.dataset:
            raise LeFusionError("the test dataset must not be the training dataset (or use --cv)")
    setup = Setup(ctx=ctx, out=Path(args.output).resolve(), preset=preset, arms=arms, seeds=seeds,
                  train_cases=train_cases, rate=args.rate, device=device, cv=args.cv, split_fold=args.split_fold,
                  cpu_bf16=preset.cpu_bf16 and device == "cpu" and cpu_has_native_bf16(),
                  roles=roles, scored=scored, detected=[s for s in scored if len(s.labels) == 1],
                  generator_args=generator_args(args, arms, roles, device))
    print(f"benchmark {ctx.dataset} {ctx.configuration}, preset {preset.name} ({preset.describe}; {preset.schedule}): "
          f"arms {', '.join(arms)} x {seeds} seed(s) = {len(arms) * seeds} runs, "
          + (f"fold {args.split_fold}'s training cases for every seed" if args.split_fold is not None else
             f"{train_cases or 'all'} training cases per seed") + f", rate {args.rate}, device {setup.device}"
          + (" (nnU-Net's steps in bf16)" if setup.cpu_bf16 else ""))
    check_finished_runs(setup)
    runs = part_of(run_list(arms, seeds), args.num_parts, args.part_id)
    left = [(name, seed) for name, seed in runs if not Run(setup, ARMS[name], seed).done]
    part = f"part {args.part_id} of {args.num_parts}" if args.num_parts > 1 else "the benchmark"
    step = step_seconds(ctx, device, setup.cpu_bf16) if left else None
    estimate = estimate_seconds(preset, left, train_cases or len(list(ctx.data_folder.glob('*.pkl'))),
                                setup.cpu_bf16, step)
    measured = f" (one nnU-Net training step took {step:.2f} s here)" if step is not None else ""
    print(f"estimated time: {estimate / 3600:.1f} h for the {len(left)} of {len(runs)} run(s) of {part} not done "
          f"yet{measured}; output {setup.out}")
    start = time.time()
    setup.out.mkdir(parents=True, exist_ok=True)
    prepare(setup, test_raw)
    results, pending = execute_part(setup, args.num_parts, args.part_id)
    if pending:
        print(f"part {args.part_id} of {args.num_parts} is done; {pending} run(s) of the other parts are not: the "
              "last part to finish writes the summary (or run any part's command again once they have)")
        return
    info = {"command": "nnUNetv2_lefusion_benchmark " + shlex.join(sys.argv[1:] if argv is None else argv),
            "dataset": ctx.dataset, "configuration": ctx.configuration, "preset": preset.name, "epochs": preset.epochs,
            "iterations": preset.iterations,
            "cpu_bf16": setup.cpu_bf16, "cpu_bf16_per_run": {run_name(r): r.get("cpu_bf16") for r in results},
            "arms": list(arms),
            "seeds": seeds, "train_cases": train_cases, "split_fold": args.split_fold, "rate": args.rate, "cv": args.cv,
            "test_cases": sorted({c for s in setup.splits for c in s["test"]}),
            "splits": setup.splits, "seconds_this_call": round(time.time() - start, 1),
            "run_seconds": run_times(results), **recorded_environments(results)}
    text, runs = write_outputs(setup.out, info, results, arms, seeds, scored, setup.detected, args.cv)
    print("\n" + text)
    times = info["run_seconds"]
    print(f"run time: {times['timed_seconds'] / 3600:.1f} h over the {times['timed_runs']} of {len(results)} runs "
          f"with recorded times (synthesis, training epochs and prediction)")
    print(f"outputs: {setup.out}/summary.json, per_case.csv, table.md, benchmark.png")
    mixed = [f"{key}: {', '.join(map(str, values))}" for key, values in info.items()
             if key in ("commits", "precisions") and len(values) > 1]
    if mixed:
        print("warning: this comparison mixes " + "; ".join(mixed) + " (metrics.json of each run says which)")
    for suffix, figures in runs.items():
        print(headline(figures, scored, roles, arms, postprocessed=bool(suffix)))


def recorded_environments(results: list[dict]) -> dict[str, list]:
    """The distinct processors, precisions and commits the runs recorded (runs from before they were: None)."""
    found = {"processors": "processor", "precisions": "precision", "commits": "commit"}
    return {key: sorted({r.get("environment", {}).get(field) for r in results}, key=str)
            for key, field in found.items()}


def headline(runs: dict, scored, roles, arms: tuple[str, ...], postprocessed: bool = False) -> str:
    """One line, over runs: each lesion class's Dice by nnU-Net's convention (every test case: a false alarm counts
    0), the rarest class's lesion-wise F1 and the false lesions per case, for the control and as each arm's paired
    difference to it [95 % t-interval over runs]."""
    lesions = [s.key for s in scored if len(s.labels) == 1 and s.labels[0] in roles.lesions]
    keys = [(f"dice_{k}_nnunet", f"Dice {k}") for k in lesions[::-1]] + [
        (f"f1_{lesions[-1]}", f"lesion F1 {lesions[-1]}"), ("false_all", "false lesions/case")]
    parts = []
    for key, label in keys:
        cells = [f"{arms[0]} {run_cell(runs[key][arms[0]]['estimate'])}"] + [
            f"{arm} {run_cell(runs[key][arm]['vs_' + arms[0]], True)}" for arm in arms[1:]]
        parts.append(f"{label}: " + "; ".join(cells))
    count = len(runs[keys[0][0]][arms[0]]["estimate"]["per_run"])
    what = ", after nnU-Net's postprocessing" if postprocessed else ""
    return f"headline (nnU-Net convention, {count} run(s) per arm{what}): " + " | ".join(parts)
