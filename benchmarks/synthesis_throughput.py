"""Synthesis throughput: LeFusion cases per minute (fast vs official schedule, fp32 vs bf16), and the training-
iteration time of online mode against nnUNetTrainerLeFusion_r000 at a stated synthesis budget, side by side.

Part 1 re-textures the lesions of fresh heart-FOV phantom cases with the sampler, once per schedule and precision
(bf16 autocast: AMX CPUs and recent GPUs). Part 2 builds both trainers in this process on a small phantom dataset
and runs them in alternating blocks of iterations; online mode synthesizes LeFusion cases between its steps under
``--time-share`` of the wall time. The figure is the ratio of mean seconds per iteration (synthesis included: the
mean, not the median, is what a training pays).

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.synthesis_throughput [--checkpoint CKPT] [--cases 4]
[--official-cases 1] [--time-share 0.1 --iterations 20 --blocks 6]``; on a GPU the same command gives the GPU
figures (``-device cuda``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import CONTROL, LEFUSION, prepare_phantom, time_trainers
from nnunet_lefusion.cli.common import check_device
from nnunet_lefusion.phantom import generate_case
from nnunet_lefusion.pretrained import SHIPPED
from nnunet_lefusion.synthesis.lefusion import LesionSampler, sampler_config


def cases_per_minute(sampler: LesionSampler, counts: dict[str, int], batch: int) -> dict[str, float]:
    """Re-textured cases per minute for every schedule (``counts``: cases per schedule) and precision."""
    cases = [generate_case(np.random.default_rng([4242, i]), True, fov="heart") for i in range(max(counts.values()))]
    rates = {}
    for mode, count in counts.items():
        images, labels = [c.image for c in cases[:count]], [c.label for c in cases[:count]]
        for precision in ("fp32", "bf16"):
            config = sampler_config(mode, precision=precision)
            start = time.perf_counter()
            sampler.resynthesize_many(images, labels, np.random.default_rng(0), config, batch_size=batch)
            minutes = (time.perf_counter() - start) / 60
            rates[f"{mode} {precision}"] = count / minutes
            print(f"{mode:8s} {precision}: {config.evaluations(sampler.schedule.num_steps)} network evaluations "
                  f"per window, {count / minutes:7.2f} cases/min ({minutes * 60 / count:.1f} s per case)", flush=True)
    return rates


def online_ratio(checkpoint: str, device: torch.device, time_share: float, iterations: int, blocks: int,
                 work: Path) -> float:
    """Mean seconds per iteration, online mode (LeFusion at ``time_share``) / the r000 control."""
    dataset = prepare_phantom(work, 993, 10, ["3d_fullres"], seed=5)  # cases no shipped model was trained on
    os.environ.update(LEFUSION_RATE="0.5", LEFUSION_MODE="online", LEFUSION_METHOD="lefusion",
                      LEFUSION_CHECKPOINT=checkpoint, LEFUSION_TIME_SHARE=str(time_share),
                      LEFUSION_CASES_PER_EPOCH="0", LEFUSION_CACHE=str(work / "online_cache"))
    os.environ.pop("LEFUSION_CONFIG", None)
    runs = time_trainers(dataset, "3d_fullres", {name: (name, {}) for name in (LEFUSION, CONTROL)},
                         iterations, blocks, device, warm_up=0)  # online synthesis would start untimed
    means = {}
    for name, (trainer, times) in runs.items():
        means[name] = statistics.mean(times)
        made = trainer.lefusion_online.made_epoch if trainer.lefusion_online else 0
        print(f"{name:32s} mean {means[name]:.3f} s/iter (median {statistics.median(times):.3f}, n={len(times)})"
              + (f", {made} LeFusion case(s) made online" if trainer.lefusion_online else ""))
        trainer.on_train_end()
    return means[LEFUSION] / means[CONTROL]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED["sampler"]),
                        help="LeFusion sampler checkpoint (default: the shipped one)")
    parser.add_argument("--cases", type=int, default=4, help="phantom cases per schedule and precision (default 4)")
    parser.add_argument("--batch", type=int, default=4, help="windows per sampler call (default 4)")
    parser.add_argument("--official-cases", type=int, default=None,
                        help="cases for the official schedule (11.6x the network evaluations; default --cases, "
                             "0 skips it)")
    parser.add_argument("--time-share", type=float, default=0.1, help="online synthesis budget (default 0.1)")
    parser.add_argument("--iterations", type=int, default=20, help="iterations per block (default 20)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per trainer, alternating (default 6)")
    parser.add_argument("--work-dir", default=None, help="keep data here (default: a temporary folder)")
    parser.add_argument("-device", "--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    device = check_device(args.device)
    sampler = LesionSampler.load(args.checkpoint, device)
    print(f"sampler {args.checkpoint}, device {device}, torch threads {torch.get_num_threads()}")
    official = args.cases if args.official_cases is None else args.official_cases
    rates = cases_per_minute(sampler, {"fast": args.cases, **({"official": official} if official else {})},
                             args.batch)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lefusion_throughput_"))
    ratio = online_ratio(args.checkpoint, torch.device(device), args.time_share, args.iterations, args.blocks, work)
    print(f"fast bf16 / fast fp32 = {rates['fast bf16'] / rates['fast fp32']:.2f}x cases per minute")
    print(f"online mode (LeFusion, {args.time_share:.0%} budget) / r000: {ratio:.3f} s/iter ratio (target <= 1.15)")


if __name__ == "__main__":
    main()
