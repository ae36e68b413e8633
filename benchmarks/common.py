"""Shared set-up for benchmarks: a phantom dataset planned and preprocessed by nnU-Net in a work folder, and
trainers timed side by side."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnunet_lefusion.nnunet.preprocess import planning_env

BIN = Path(sys.executable).parent
LEFUSION, CONTROL = "nnUNetTrainerLeFusion", "nnUNetTrainerLeFusion_r000"


def run(*cmd: str, env: dict[str, str] | None = None) -> None:
    """Run a console script of this environment, failing loudly."""
    subprocess.run([str(BIN / cmd[0]), *cmd[1:]], check=True, stdout=subprocess.DEVNULL, env=env)


def prepare_phantom(work: Path, dataset_id: int, num_cases: int, configurations: list[str], fov: str = "heart",
                    seed: int = 0) -> str:
    """Export nnU-Net folders under ``work``; make, plan and preprocess a phantom dataset once; return its name."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = str(work / key)
        (work / key).mkdir(parents=True, exist_ok=True)
    raw = list((work / "nnUNet_raw").glob(f"Dataset{dataset_id:03d}_*"))
    if not raw:
        run("nnUNetv2_lefusion_phantom", "-d", str(dataset_id), "-n", str(num_cases), "--fov", fov,
            "--seed", str(seed))
    missing = [c for c in configurations
               if not list((work / "nnUNet_preprocessed").glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans_{c}"))]
    if missing:
        run("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *missing, "-np", "2", "-npfp", "2",
            env=planning_env(os.environ))
    return next((work / "nnUNet_raw").glob(f"Dataset{dataset_id:03d}_*")).name


def trainer_timing_parser(doc: str, iterations: int, blocks: int) -> argparse.ArgumentParser:
    """The arguments of a benchmark that times trainers side by side: -c, --iterations, --blocks, --work-dir."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("-c", dest="configuration", default="3d_fullres")
    parser.add_argument("--iterations", type=int, default=iterations, help="iterations per block")
    parser.add_argument("--blocks", type=int, default=blocks, help="blocks per trainer, alternating")
    parser.add_argument("--work-dir", default=None, help="keep data here (default: a temporary folder)")
    return parser


def timing_phantom(args: argparse.Namespace) -> str:
    """The 10-case phantom of a trainer-timing benchmark, in ``--work-dir`` (or a temporary folder); nnU-Net's
    augmentation workers default to one per core (at most 12); the user's settings file and cache are set aside."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lefusion_bench_"))
    os.environ.setdefault("nnUNet_n_proc_DA", str(min(os.cpu_count() or 1, 12)))
    for var in ("LEFUSION_CONFIG", "LEFUSION_CACHE"):
        os.environ.pop(var, None)
    return prepare_phantom(work, 992, 10, [args.configuration])


def time_trainers(dataset: str, configuration: str, variants: dict[str, tuple[str, dict[str, str]]],
                  iterations: int, blocks: int, device: torch.device, warm_up: int = 3
                  ) -> dict[str, tuple[object, list[float]]]:
    """Build one real trainer per variant (name -> trainer class name and the environment it is built under),
    run ``warm_up`` untimed iterations each, then time training iterations in alternating blocks (A B, B A, ...) so
    that machine drift hits every variant. The epoch holds every iteration (online mode spreads its budget over the
    epoch's steps). Returns name -> (trainer, seconds per iteration); the trainers are left started (call
    ``on_train_end``)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_lefusion.nnunet.register import register

    register()
    timed = {}
    for name, (trainer_name, env) in variants.items():
        os.environ.update(env)
        torch.manual_seed(0)
        trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, device=device)
        trainer.num_iterations_per_epoch = warm_up + iterations * blocks
        trainer.disable_checkpointing = True
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        for _ in range(warm_up):
            trainer.train_step(next(trainer.dataloader_train))
        timed[name] = (trainer, [])
    runs = list(timed.values())
    for block in range(blocks):
        for trainer, times in (runs if block % 2 == 0 else runs[::-1]):
            for _ in range(iterations):
                start = time.perf_counter()
                trainer.train_step(next(trainer.dataloader_train))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    return timed


def median_seconds(timed: dict[str, tuple[object, list[float]]]) -> dict[str, float]:
    """Median seconds per iteration of each timed variant."""
    return {name: statistics.median(times) for name, (_, times) in timed.items()}
