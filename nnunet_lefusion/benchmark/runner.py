"""Run a benchmark: per arm and seed, the arm's cache from that seed's training cases, nnU-Net training through the
LeFusion trainer, nnU-Net's predictor on the test cases, and the per-case figures; every stage resumable.

Layout of the output folder ``OUT``::

    nnUNet_preprocessed/<Dataset>/   links to the dataset's preprocessed files + this benchmark's splits_final.json
                                     (fold k = seed k's training cases), so the user's split is never touched
    test/                            the held-out test set (a phantom made with another seed), or links to the
                                     validation images of each fold (--cv)
    runs/<arm>/seed_<k>/             cache/, nnUNet_results/, predictions/, log.txt and metrics.json (run done)
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.benchmark.environment import describe
from nnunet_lefusion.benchmark.metrics import Structure, case_figures
from nnunet_lefusion.benchmark.plan import ARMS, NNUNET_SCHEDULE, Arm, Preset, draw_training_cases, run_list
from nnunet_lefusion.config import ENV_VARIABLES, TrainerSettings, write_settings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import atomic_write_text
from nnunet_lefusion.nnunet.context import DatasetContext, part_of, training_cases
from nnunet_lefusion.phantom import write_dataset
from nnunet_lefusion.precision import CPU_BF16_LOG_LINE
from nnunet_lefusion.training.roi_data import read_volume

METRICS_FILE = "metrics.json"
SETTINGS_YAML = "lefusion.yaml"   # the trainer's settings of a run (LEFUSION_CONFIG)
_PR_SET_PDEATHSIG = 1
_OWN_FILES = {"splits_final.json", "lefusion_cache", "lefusion.yaml"}


@dataclass
class Setup:
    """Everything the runs share."""

    ctx: DatasetContext          # the training dataset, read through the real nnUNet_preprocessed
    out: Path
    preset: Preset
    arms: tuple[str, ...]
    seeds: int
    train_cases: int | None
    rate: float
    device: str
    cv: bool
    split_fold: int | None       # every seed trains on this fold of the dataset's own splits_final.json
    cpu_bf16: bool               # nnU-Net's steps in bf16: the preset asks for it and the CPU has it natively
    roles: LesionLabels
    scored: list[Structure]
    detected: list[Structure]
    generator_args: dict[str, list[str]] = field(default_factory=dict)   # synthesize flags per arm
    splits: list[dict] = field(default_factory=list)     # fold k: {"train": [...], "val": [...], "test": [...]}
    test_images: dict[str, Path] = field(default_factory=dict)   # case -> folder holding its image(s)
    test_labels: dict[str, Path] = field(default_factory=dict)


def _link_preprocessed(ctx: DatasetContext, target: Path) -> None:
    """Mirror the dataset's preprocessed folder by symbolic links (our split file is the one real file)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in ctx.preprocessed_folder.iterdir():
        link = target / entry.name
        if entry.name not in _OWN_FILES and not link.exists():
            try:
                link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
            except FileExistsError:  # another part of this benchmark made it meanwhile
                pass


def _phantom_test_set(ctx: DatasetContext, out: Path, count: int) -> Path:
    """A held-out phantom test set: the training phantom's field of view, drawn with another seed."""
    origin = ctx.dataset_json.get("lefusion_phantom")
    if origin is None:
        raise LeFusionError(f"{ctx.dataset} is not a LeFusion phantom: give a test set with --test-dataset ID, or "
                            "use nnU-Net's cross-validation folds with --cv")
    folder = out / "test"
    if not folder.is_dir():  # written aside and renamed, so neither a kill nor a second part sees half of it
        scratch = out / f".test.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        write_dataset(int(ctx.dataset[7:10]), count, origin["seed"] + 1000, scratch, name="HeldOutTest",
                      fov=origin["fov"], normal_fraction=origin["normal_fraction"])
        try:
            scratch.rename(folder)
        except OSError:  # another part of this benchmark was first (with the same cases: the same seed)
            shutil.rmtree(scratch)
    made = sorted(folder.glob("Dataset*/dataset.json"))
    if not made:
        raise LeFusionError(f"{folder} holds no complete test set (left by an interrupted older version?): remove it")
    return made[0].parent


def _raw_pairs(raw: Path) -> dict[str, tuple[Path, Path]]:
    """identifier -> (folder of its images, label file) of a raw dataset's training cases."""
    return {ident: (image.parent, label)
            for ident, image, label in training_cases(raw)}


def prepare(setup: Setup, test_dataset: Path | None) -> None:
    """Splits, the linked preprocessed folder and the test cases (idempotent)."""
    ctx, out = setup.ctx, setup.out
    pool = sorted(p.stem for p in ctx.data_folder.glob("*.pkl"))
    if setup.cv:
        splits = [dict(zip(("train", "val"), DatasetContext(ctx.dataset, ctx.configuration, k,
                                                              ctx.plans_identifier).split)) for k in range(setup.seeds)]
        for k, split in enumerate(splits):
            split["train"] = draw_training_cases(split["train"], setup.train_cases, k)
            split["test"] = split["val"]
        pairs = _raw_pairs(ctx.raw_folder)
    else:
        test_raw = test_dataset or _phantom_test_set(ctx, out, setup.preset.test_cases)
        pairs = _raw_pairs(test_raw)
        splits = []
        for k in range(setup.seeds):
            if setup.split_fold is not None:   # the same cases for every seed: seeds differ by nnU-Net's randomness
                train, val = DatasetContext(ctx.dataset, ctx.configuration, setup.split_fold,
                                            ctx.plans_identifier).split
                splits.append({"train": sorted(train), "val": sorted(val), "test": sorted(pairs)})
                continue
            train = draw_training_cases(pool, setup.train_cases, k)
            rest = draw_training_cases([c for c in pool if c not in train], 5, k)   # nnU-Net's own validation
            if not rest:
                raise LeFusionError(f"--train-cases {setup.train_cases} leaves no case of {len(pool)} for nnU-Net's "
                                    "validation; use fewer")
            splits.append({"train": train, "val": rest, "test": sorted(pairs)})
    setup.splits = splits
    setup.test_images = {c: pairs[c][0] for s in splits for c in s["test"]}
    setup.test_labels = {c: pairs[c][1] for s in splits for c in s["test"]}
    linked = out / "nnUNet_preprocessed" / ctx.dataset
    _link_preprocessed(ctx, linked)
    atomic_write_text(linked / "splits_final.json",
                      json.dumps([{"train": s["train"], "val": s["val"]} for s in splits], indent=1))


def _die_with_parent() -> None:
    """In a child process: be killed when the benchmark dies (even by ``kill -9``), so that a re-run never finds
    an orphaned training still writing into its folder (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")


class Run:
    """One arm trained with one seed's training cases."""

    def __init__(self, setup: Setup, arm: Arm, seed: int):
        self.setup, self.arm, self.seed = setup, arm, seed
        self.folder = setup.out / "runs" / arm.name / f"seed_{seed}"
        self.trainer = ("nnUNetTrainerLeFusion_r000" if arm.method is None else "nnUNetTrainerLeFusion") + (
            "_short" if setup.preset.short else "")

    @property
    def done(self) -> bool:
        return (self.folder / METRICS_FILE).is_file()

    @property
    def settings_file(self) -> Path:
        return self.folder / SETTINGS_YAML

    def settings(self) -> TrainerSettings:
        """The trainer's settings of this run: its arm's rate (``real_balanced``: the benchmark's rate as its
        ``rare_focus``, real cases only), its cache, the preset's schedule and precision."""
        preset = self.setup.preset
        schedule = {"epochs": preset.epochs, "iterations": preset.iterations,
                    "val_iterations": preset.val_iterations} if preset.short else {}
        return TrainerSettings(rate=0.0 if self.arm.method is None else self.setup.rate, mode="cache",
                               cache=str(self.folder / "cache"), cpu_bf16=self.setup.cpu_bf16,
                               rare_focus=self.setup.rate if self.arm.rare_focus else 0.0, **schedule)

    def env(self) -> dict[str, str]:
        """The environment of this run's commands: its nnU-Net folders and its settings file (written by
        :meth:`execute`); the caller's ``LEFUSION_*`` variables are left out, so they cannot change a run."""
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
        # nnU-Net's validation and export spawn nnUNet_def_n_proc workers (8 by default): no more than the cores
        env.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
        env.update(nnUNet_preprocessed=str(self.setup.out / "nnUNet_preprocessed"),
                   nnUNet_results=str(self.folder / "nnUNet_results"), nnUNet_compile="false",
                   LEFUSION_CONFIG=str(self.settings_file))
        return env

    def _call(self, stage: str, cmd: list[str]) -> float:
        """Run one stage's command, its output appended to the run's log; returns its wall seconds."""
        start = time.perf_counter()
        tool = Path(sys.executable).parent / cmd[0]
        with (self.folder / "log.txt").open("a") as log:
            log.write(f"\n=== {stage}: {' '.join(cmd)}\n")
            log.flush()
            result = subprocess.run([str(tool) if tool.exists() else cmd[0], *cmd[1:]], env=self.env(),
                                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            log.write(f"=== {stage} took {time.perf_counter() - start:.1f} s\n")
        if result.returncode != 0:
            raise LeFusionError(f"{self.arm.name} seed {self.seed}: {stage} failed (exit {result.returncode}); "
                                f"see {self.folder / 'log.txt'}")
        return time.perf_counter() - start

    def _stage_done(self, stage: str) -> bool:
        return (self.folder / f"{stage}.done").is_file()

    def _mark(self, stage: str, seconds: float | None = None) -> None:
        atomic_write_text(self.folder / f"{stage}.done", "" if seconds is None else f"{seconds:.1f}")

    def _stage_seconds(self, stage: str) -> float | None:
        """Seconds stored with a finished stage's marker (None: not run, or marked without them)."""
        marker = self.folder / f"{stage}.done"
        text = marker.read_text().strip() if marker.is_file() else ""
        return float(text) if text else None

    def epoch_seconds(self) -> float:
        """nnU-Net's logged epoch times of this run's training, summed over all its logs (a training resumed with
        ``--c`` writes a new log; epochs trained again after an interruption count again, as they cost again)."""
        logs = (self.folder / "nnUNet_results").rglob("training_log_*.txt")
        return sum(float(m) for log in logs for m in EPOCH_TIME.findall(log.read_text(errors="replace")))

    def trained_in_bf16(self) -> bool:
        """Whether nnU-Net's logs of this run say its steps ran under the trainer's CPU bf16 autocast."""
        return any(CPU_BF16_LOG_LINE in log.read_text(errors="replace")
                   for log in (self.folder / "nnUNet_results").rglob("training_log_*.txt"))

    def execute(self, progress: tqdm) -> None:
        """Every stage not yet done; a stage interrupted before its marker starts again from scratch (training
        continues from nnU-Net's latest checkpoint)."""
        ctx, preset = self.setup.ctx, self.setup.preset
        self.folder.mkdir(parents=True, exist_ok=True)
        write_settings(self.settings(), self.settings_file)
        dataset, fold = str(ctx.dataset), str(self.seed)
        started = self.folder / "environment.json"   # what the run started on (a resumed run may differ)
        if not started.is_file():
            atomic_write_text(started, json.dumps(describe(self.setup.device, self.setup.cpu_bf16)))
        if self.arm.method and not self._stage_done("cache"):
            progress.set_postfix_str(f"{self.arm.name} seed {self.seed}: synthesize")
            count = max(1, round(len(self.setup.splits[self.seed]["train"]) * preset.synthetic_per_case))
            seconds = self._call("synthesize", [
                "nnUNetv2_lefusion_synthesize", "-d", dataset, "-c", ctx.configuration, "-f", fold,
                "-p", ctx.plans_identifier, "--method", self.arm.method, "-n", str(count), "--seed", fold,
                "--cache", str(self.folder / "cache"), "--overwrite",
                *self.setup.generator_args.get(self.arm.name, [])])
            self._mark("cache", seconds)
        if not self._stage_done("train"):
            progress.set_postfix_str(f"{self.arm.name} seed {self.seed}: train")
            resume = ["--c"] if any((self.folder / "nnUNet_results").rglob("checkpoint_latest.pth")) else []
            self._call("train", ["nnUNetv2_train", dataset, ctx.configuration, fold, "-tr", self.trainer,
                                 "-p", ctx.plans_identifier, "-device", self.setup.device, *resume])
            self._mark("train")
        progress.set_postfix_str(f"{self.arm.name} seed {self.seed}: predict")
        start = time.perf_counter()
        predictions = self._predict()
        postprocessed = None if self.setup.cv else self._postprocess(predictions)
        stage_seconds = {"synthesize": self._stage_seconds("cache"), "train": round(self.epoch_seconds(), 1),
                         "predict": round(time.perf_counter() - start, 1)}
        epochs, iterations = run_schedule(preset)
        environment = json.loads(started.read_text())
        finished = describe(self.setup.device, self.trained_in_bf16())
        atomic_write_text(self.folder / METRICS_FILE, json.dumps({
            "environment": {**environment, "precision": finished["precision"]},
            **({"environment_at_end": finished} if finished["commit"] != environment["commit"]
               or finished["processor"] != environment["processor"] else {}),
            "arm": self.arm.name, "seed": self.seed, "trainer": self.trainer,
            "training_cases": self.setup.splits[self.seed]["train"], "cases": self._score(predictions),
            **({} if postprocessed is None else {"cases_postprocessed": self._score(postprocessed),
                                                 "postprocessing": self._postprocessing_steps()}),
            "curves": self.curves(), "lesion_voxels_per_load": self.lesion_voxels_per_load(),
            "seconds": stage_seconds, "cpu_bf16": self.trained_in_bf16(), "epochs": epochs,
            "iterations": iterations}))

    def _score(self, predictions: Path) -> list[dict]:
        """Every figure of every test case of this run's predictions."""
        rows = []
        for case in self.setup.splits[self.seed]["test"]:
            reference, header = read_volume(self.setup.test_labels[case])
            predicted, _ = read_volume(predictions / f"{case}{self.setup.ctx.dataset_json['file_ending']}")
            rows.append({"case": case, **case_figures(reference, predicted, header.GetSpacing()[::-1],
                                                      self.setup.scored, self.setup.detected)})
        return rows

    def _model_folder(self) -> Path:
        found = sorted((self.folder / "nnUNet_results").rglob(f"fold_{self.seed}/checkpoint_final.pth"))
        if not found:
            raise LeFusionError(f"{self.arm.name} seed {self.seed}: no final checkpoint under {self.folder}")
        return found[0].parent.parent

    def _postprocess(self, predictions: Path) -> Path:
        """nnU-Net's postprocessing, decided on this run's validation cases (never the test cases) as
        ``nnUNetv2_determine_postprocessing`` decides it, applied to the test predictions."""
        final, partial = self.folder / "predictions_postprocessed", self.folder / "predictions_postprocessed.partial"
        if final.is_dir():
            return final
        model = self._model_folder()
        validation = model / f"fold_{self.seed}" / "validation"
        files = ["-plans_json", str(model / "plans.json"), "-dataset_json", str(model / "dataset.json"), "-np", "1"]
        if not (validation / "postprocessing.pkl").is_file():
            gt = self.setup.out / "nnUNet_preprocessed" / self.setup.ctx.dataset / "gt_segmentations"
            self._call("decide postprocessing", ["nnUNetv2_determine_postprocessing", "-i", str(validation),
                                                 "-ref", str(gt), *files])
        shutil.rmtree(partial, ignore_errors=True)
        self._call("apply postprocessing", ["nnUNetv2_apply_postprocessing", "-i", str(predictions), "-o",
                                            str(partial), "-pp_pkl_file", str(validation / "postprocessing.pkl"),
                                            *files])
        partial.rename(final)
        return final

    def _postprocessing_steps(self) -> dict:
        """What nnU-Net decided (from its postprocessing.json: the functions and their arguments)."""
        decided = self._model_folder() / f"fold_{self.seed}" / "validation" / "postprocessing.json"
        found = json.loads(decided.read_text()) if decided.is_file() else {}
        return {k: found.get(k) for k in ("postprocessing_fns", "postprocessing_kwargs")}

    def _predict(self) -> Path:
        """nnU-Net's predictor on this seed's test cases, into a fresh folder renamed when complete."""
        ctx = self.setup.ctx
        final, partial = self.folder / "predictions", self.folder / "predictions.partial"
        if final.is_dir():
            return final
        shutil.rmtree(partial, ignore_errors=True)
        inputs = self.folder / "test_images"
        shutil.rmtree(inputs, ignore_errors=True)
        inputs.mkdir()
        for case in self.setup.splits[self.seed]["test"]:
            for image in self.setup.test_images[case].glob(f"{case}_[0-9][0-9][0-9][0-9]*"):
                (inputs / image.name).symlink_to(image.resolve())
        self._call("predict", ["nnUNetv2_predict", "-i", str(inputs), "-o", str(partial), "-d", str(ctx.dataset),
                               "-c", ctx.configuration, "-f", str(self.seed), "-tr", self.trainer,
                               "-p", ctx.plans_identifier, "-device", self.setup.device, "-npp", "1", "-nps", "1"]
                   + (["--disable_tta"] if self.setup.preset.short else []))
        partial.rename(final)
        shutil.rmtree(inputs)
        return final

    def lesion_voxels_per_load(self) -> dict[str, float]:
        """Lesion voxels per training-case load, per lesion label, real and synthetic loads together, over the whole
        training (from the trainer's statistics): what each arm's training saw of each class."""
        found = sorted((self.folder / "nnUNet_results").rglob("lefusion_stats.json"))
        if not found:
            return {}
        epochs = json.loads(found[0].read_text())["epochs"]
        loads = sum(e["loads"] for e in epochs)
        totals: dict[str, int] = {}
        for entry in epochs:
            for kind in ("real", "synthetic"):
                for label, count in entry["lesion_voxels"][kind].items():
                    totals[label] = totals.get(label, 0) + count
        return {label: round(count / loads, 1) for label, count in totals.items()} if loads else {}

    def curves(self) -> dict[str, list[float]]:
        """nnU-Net's logged training loss, validation loss and pseudo Dice per epoch."""
        import torch

        found = sorted((self.folder / "nnUNet_results").rglob("checkpoint_final.pth"))
        if not found:
            return {}
        logging = torch.load(found[0], map_location="cpu", weights_only=False).get("logging", {})
        return {k: [float(v) for v in logging.get(k, [])] for k in ("train_losses", "val_losses", "ema_fg_dice")}


def run_schedule(preset: Preset) -> tuple[int, int]:
    """Epochs and training iterations per epoch of each run of ``preset``."""
    return (preset.epochs, preset.iterations) if preset.short else NNUNET_SCHEDULE[:2]


def check_finished_runs(setup: Setup) -> None:
    """Refuse an output folder whose finished runs trained on another schedule than ``setup``'s (their figures
    would be mixed into this benchmark's). Runs recorded before the schedule was: their epochs from the curves."""
    epochs, iterations = run_schedule(setup.preset)
    for name, seed in run_list(setup.arms, setup.seeds):
        run = Run(setup, ARMS[name], seed)
        if not run.done:
            continue
        metrics = json.loads((run.folder / METRICS_FILE).read_text())
        done = (metrics.get("epochs", len(metrics.get("curves", {}).get("train_losses", [])) or None),
                metrics.get("iterations", iterations))
        if done != (epochs, iterations):
            raise LeFusionError(f"{run.folder} holds a run of {done[0]} epochs x {done[1]} iterations, this benchmark "
                                f"trains {epochs} x {iterations}: give another output folder (-o)")


def execute_part(setup: Setup, num_parts: int = 1, part_id: int = 0) -> tuple[list[dict], int]:
    """This part's runs (every run for one part; finished ones skipped) with a progress bar; returns the metrics of
    every finished run, of all parts, and the number of runs of the other parts not finished yet."""
    runs = [Run(setup, ARMS[name], seed) for name, seed in run_list(setup.arms, setup.seeds)]
    mine = part_of(runs, num_parts, part_id)
    pending = [run for run in mine if not run.done]
    with tqdm(pending, desc="benchmark runs" + (f" (part {part_id} of {num_parts})" if num_parts > 1 else ""),
              unit="run", total=len(mine), initial=len(mine) - len(pending)) as progress:
        for run in progress:
            run.execute(progress)
    finished = [run for run in runs if run.done]
    return [json.loads((run.folder / METRICS_FILE).read_text()) for run in finished], len(runs) - len(finished)
