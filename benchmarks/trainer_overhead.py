"""Training-iteration time of nnUNetTrainerLeFusion (rate 0.5, cache) vs the control nnUNetTrainerLeFusion_r000.

Both trainers run side by side in one process on the same phantom dataset, in alternating blocks of iterations
(A B, B A, A B, ...) so that machine drift hits both; the figure is the ratio of median seconds per iteration.
Target: ratio <= 1.03.  Usage: python -m benchmarks.trainer_overhead [--iterations 15 --blocks 4 -c 3d_fullres]
"""
from __future__ import annotations

import os
import statistics

import torch

from benchmarks.common import (CONTROL, LEFUSION, median_seconds, run, time_trainers, timing_phantom,
                               trainer_timing_parser)


def main() -> None:
    args = trainer_timing_parser(__doc__, 15, 4).parse_args()
    dataset = timing_phantom(args)
    run("nnUNetv2_lefusion_synthesize", "-d", "992", "-c", args.configuration, "-f", "0", "-n", "16", "--overwrite")
    os.environ["LEFUSION_RATE"] = "0.5"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainers = time_trainers(dataset, args.configuration, {name: (name, {}) for name in (LEFUSION, CONTROL)},
                             args.iterations, args.blocks, device)
    medians = median_seconds(trainers)
    for name, (trainer, times) in trainers.items():
        loads, synthetic = trainer.lefusion_counters.snapshot()
        print(f"{name:32s} median {medians[name]:.4f} s/iter (mean {statistics.mean(times):.4f}, "
              f"n={len(times)}), synthetic loads {synthetic}/{loads}")
        trainer.on_train_end()
    ratio = medians[LEFUSION] / medians[CONTROL]
    print(f"device {device}, configuration {args.configuration}, DA workers {os.environ['nnUNet_n_proc_DA']}")
    print(f"ratio LeFusion(rate 0.5, cache) / r000 = {ratio:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
