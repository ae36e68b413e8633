"""Training-iteration time on a CPU of nnU-Net in fp32 (its CPU default) vs bf16 autocast (``LEFUSION_CPU_BF16=1``).

Two control trainers (nnUNetTrainerLeFusion_r000) on the same phantom dataset, one built with the setting off and
one with it on, run side by side in one process in alternating blocks of iterations; the figure is the ratio of
median seconds per iteration, fp32 / bf16 (the speed-up). Worth it on CPUs with AMX or AVX512-BF16; elsewhere bf16
may be slower. Usage: python benchmarks/trainer_precision.py [--iterations 10 --blocks 4 -c 3d_fullres]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from benchmarks.common import CONTROL, median_seconds, prepare_phantom, time_trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", dest="configuration", default="3d_fullres")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per precision, alternating")
    parser.add_argument("--work-dir", default=None, help="keep data here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lefusion_bench_"))
    os.environ.setdefault("nnUNet_n_proc_DA", str(min(os.cpu_count() or 1, 12)))
    dataset = prepare_phantom(work, 992, 10, [args.configuration])
    for var in ("LEFUSION_CONFIG", "LEFUSION_CACHE"):
        os.environ.pop(var, None)

    trainers = time_trainers(dataset, args.configuration,
                             {precision: (CONTROL, {"LEFUSION_CPU_BF16": flag})
                              for precision, flag in (("fp32", "0"), ("bf16", "1"))},
                             args.iterations, args.blocks, torch.device("cpu"))
    medians = median_seconds(trainers)
    for name, (trainer, times) in trainers.items():
        print(f"{name}: median {medians[name]:.3f} s/iter (n={len(times)})")
        trainer.on_train_end()
    print(f"CPU, {torch.get_num_threads()} threads, configuration {args.configuration}, "
          f"DA workers {os.environ['nnUNet_n_proc_DA']}")
    print(f"speed-up of bf16 autocast on the CPU: fp32 / bf16 = {medians['fp32'] / medians['bf16']:.2f}x")


if __name__ == "__main__":
    main()
