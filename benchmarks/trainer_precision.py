"""Training-iteration time on a CPU of nnU-Net in fp32 (its CPU default) vs bf16 autocast (``LEFUSION_CPU_BF16=1``).

Two control trainers (nnUNetTrainerLeFusion_r000) on the same phantom dataset, one built with the setting off and
one with it on, run side by side in one process in alternating blocks of iterations; the figure is the ratio of
median seconds per iteration, fp32 / bf16 (the speed-up). Worth it on CPUs with AMX or AVX512-BF16; elsewhere bf16
may be slower. Usage: python -m benchmarks.trainer_precision [--iterations 10 --blocks 4 -c 3d_fullres]
"""
from __future__ import annotations

import os

import torch

from benchmarks.common import CONTROL, median_seconds, time_trainers, timing_phantom, trainer_timing_parser


def main() -> None:
    args = trainer_timing_parser(__doc__, 10, 4).parse_args()
    dataset = timing_phantom(args)

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
