"""Training-iteration time of nnUNetTrainerLeFusion (rate 0.5, cache) vs the control nnUNetTrainerLeFusion_r000.

Both trainers run side by side in one process on the same phantom dataset, in alternating blocks of iterations
(A B, B A, A B, ...) so that machine drift hits both; the figure is the ratio of median seconds per iteration.
Target: ratio <= 1.03.  Usage: python benchmarks/trainer_overhead.py [--iterations 15 --blocks 4 -c 3d_fullres]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import prepare_phantom, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", dest="configuration", default="3d_fullres")
    parser.add_argument("--iterations", type=int, default=15, help="iterations per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per trainer, alternating")
    parser.add_argument("--work-dir", default=None, help="keep data here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lefusion_bench_"))
    os.environ.setdefault("nnUNet_n_proc_DA", str(min(os.cpu_count() or 1, 12)))
    dataset = prepare_phantom(work, 992, 10, [args.configuration])
    run("nnUNetv2_lefusion_synthesize", "-d", "992", "-c", args.configuration, "-f", "0", "-n", "16", "--overwrite")
    os.environ["LEFUSION_RATE"] = "0.5"
    for var in ("LEFUSION_CONFIG", "LEFUSION_CACHE"):
        os.environ.pop(var, None)

    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_lefusion.nnunet.register import register
    from nnunet_lefusion.nnunet.trainer import nnUNetTrainerLeFusion, nnUNetTrainerLeFusion_r000

    register()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainers = {}
    for cls in (nnUNetTrainerLeFusion, nnUNetTrainerLeFusion_r000):
        torch.manual_seed(0)
        trainer = get_trainer_from_args(dataset, args.configuration, 0, cls.__name__, device=device)
        trainer.disable_checkpointing = True
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        for _ in range(3):  # warm-up
            trainer.train_step(next(trainer.dataloader_train))
        trainers[cls.__name__] = (trainer, [])
    runs = list(trainers.values())
    for block in range(args.blocks):
        for trainer, times in (runs if block % 2 == 0 else runs[::-1]):
            for _ in range(args.iterations):
                start = time.perf_counter()
                trainer.train_step(next(trainer.dataloader_train))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, (_, times) in trainers.items()}
    for name, (trainer, times) in trainers.items():
        loads, synthetic = trainer.lefusion_counters.snapshot()
        print(f"{name:32s} median {medians[name]:.4f} s/iter (mean {statistics.mean(times):.4f}, "
              f"n={len(times)}), synthetic loads {synthetic}/{loads}")
        trainer.on_train_end()
    ratio = medians["nnUNetTrainerLeFusion"] / medians["nnUNetTrainerLeFusion_r000"]
    print(f"device {device}, configuration {args.configuration}, DA workers {os.environ['nnUNet_n_proc_DA']}")
    print(f"ratio LeFusion(rate 0.5, cache) / r000 = {ratio:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
