"""``nnUNetTrainerLeFusion`` and its variants: nnU-Net's trainer with synthetic cases injected at a rate.

Each variant overrides one thing, like nnU-Net's own trainer variants. The constructor keeps nnU-Net's signature;
rate, cache and mode come from ``lefusion.yaml`` / ``$LEFUSION_CONFIG`` and ``LEFUSION_*`` variables
(see :mod:`nnunet_lefusion.config`), except in the ``_rXXX`` variants whose name fixes the rate.
Mode ``online`` also synthesizes cases during training (:mod:`nnunet_lefusion.nnunet.online`).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_lefusion.cli.common import check_device
from nnunet_lefusion.config import TrainerSettings, load_settings
from nnunet_lefusion.errors import LeFusionError, LeFusionExit
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import Manifest, atomic_write_text, default_cache_folder, recorded_labels
from nnunet_lefusion.nnunet.context import DatasetContext, env_folder
from nnunet_lefusion.nnunet.dataset import LoadCounters, SyntheticMixDataset
from nnunet_lefusion.nnunet.online import OnlineProducer, online_generators, online_labels
from nnunet_lefusion.precision import CPU_BF16_LOG_LINE, cpu_bf16_autocast, cpu_has_native_bf16

STATS_FILE = "lefusion_stats.json"


class nnUNetTrainerLeFusion(nnUNetTrainer):
    """nnU-Net training where a loaded training case is replaced by a cached synthetic case with prob. ``rate``
    (mode ``online``: the cache is also filled during training)."""

    fixed_rate: float | None = None  # set by the _rXXX variants: their name must tell the truth

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.lefusion = self.check_lefusion_input(plans, configuration, fold)  # before nnU-Net writes anything
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lefusion_counters = LoadCounters()
        self.lefusion_epochs: list[dict] = []
        self.lefusion_online = None  # the OnlineProducer of mode online
        self._lefusion_seen = {"loads": 0, "synthetic": 0, "voxels": None}
        self._lefusion_step = 0
        self._lefusion_loaded: dict[str, int] = {}  # synthetic identifier -> loads, this epoch
        self._lefusion_lost = 0
        self._lefusion_new_ids: set[str] = set()

    @classmethod
    def check_lefusion_input(cls, plans: dict, configuration: str, fold: int | str) -> TrainerSettings:
        """The settings, and their cache checked against this dataset, plans, configuration and fold, before nnU-Net
        creates the output folder or builds the network. A problem raises :class:`LeFusionExit`: one
        ``nnUNetv2_train: error: ...`` line and exit code 2 instead of a traceback."""
        try:
            env_folder("nnUNet_results")
            preprocessed = env_folder("nnUNet_preprocessed") / plans["dataset_name"]
            settings = load_settings(preprocessed / "lefusion.yaml")
            if cls.fixed_rate is not None:
                settings.rate = cls.fixed_rate
            if settings.rate > 0:
                ctx = DatasetContext(plans["dataset_name"], configuration, fold, plans["plans_name"])
                ctx.check_single_stage()
                folder = Path(settings.cache) if settings.cache else default_cache_folder(ctx)
                if settings.mode == "cache":
                    Manifest.load(folder).check_matches(ctx, ctx.split[0], folder)
                else:  # the cache (if any) fits, the generators exist, fit the labels and saw no validation case
                    if settings.device:
                        check_device(settings.device)
                    online_generators(ctx, online_labels(ctx, folder), settings, settings.device or "cpu")
        except LeFusionError as exc:
            raise LeFusionExit(str(exc)) from None
        return settings

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary name and renamed: a run killed while saving keeps its
        previous checkpoint intact, so ``--c`` can continue (nnU-Net writes in place)."""
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.isfile(partial):  # rank 0 with checkpointing enabled wrote it
            os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._resume_lefusion_stats()

    def _resume_lefusion_stats(self) -> None:
        """``--c``: continue the statistics of the epochs the checkpoint holds (later epochs in the file, written
        after that checkpoint, are trained again and counted anew)."""
        path = Path(self.output_folder) / STATS_FILE
        self.lefusion_epochs = []
        try:
            earlier = [e for e in json.loads(path.read_text())["epochs"] if int(e["epoch"]) < self.current_epoch]
            self.lefusion_epochs = earlier
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.print_to_log_file(f"LeFusion: cannot read the statistics of the earlier epochs ({path}: "
                                   f"{type(exc).__name__}); counting from this epoch on")
        if self.lefusion_epochs:
            self.print_to_log_file(f"LeFusion: resumed the statistics of {len(self.lefusion_epochs)} earlier epochs")

    def _lesion_labels(self, manifest: Manifest | None) -> LesionLabels | None:
        """The cache's lesion labels, else those named in dataset.json; None if there are none (no voxel counts)."""
        try:
            return recorded_labels(manifest, self.dataset_json)
        except LeFusionError as exc:
            self.print_to_log_file(f"LeFusion: no lesion voxel counts ({exc})")
            return None

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        try:
            return self._with_synthetic_cases(dataset_tr), dataset_val
        except LeFusionError as exc:  # a cache or generator that changed since the check at construction
            raise LeFusionExit(str(exc)) from None

    def _with_synthetic_cases(self, dataset_tr) -> SyntheticMixDataset:
        folder, variants, manifest, online = None, {}, None, self.lefusion.mode == "online"
        if self.lefusion.rate > 0:
            ctx = DatasetContext(self.plans_manager.dataset_name, self.configuration_name, self.fold,
                                 self.plans_manager.plans_name)
            ctx.check_single_stage()
            folder = Path(self.lefusion.cache) if self.lefusion.cache else default_cache_folder(ctx)
            if online:
                labels = online_labels(ctx, folder)
                rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if self.is_ddp \
                    else (0, 1)
                self.lefusion_online = OnlineProducer(ctx, folder, labels, self.lefusion, str(self.device), rank,
                                                      world, self.print_to_log_file)
                manifest = self.lefusion_online.start()
            else:
                manifest = Manifest.load(folder)
            manifest.check_matches(ctx, list(dataset_tr.identifiers), folder)
            variants = manifest.variants_by_source()
            covered = sum(1 for i in dataset_tr.identifiers if variants.get(i))
            self.print_to_log_file(f"LeFusion: mode {self.lefusion.mode}, rate {self.lefusion.rate}, cache {folder}: "
                                   f"{len(manifest.cases)} synthetic cases for {covered}/"
                                   f"{len(dataset_tr.identifiers)} training cases")
        else:
            self.print_to_log_file("LeFusion: rate 0, no synthetic cases (control run)")
        labels = self._lesion_labels(manifest)
        self.lefusion_counters = LoadCounters(labels.lesions if labels is not None else ())
        return SyntheticMixDataset(dataset_tr, folder, variants, self.lefusion.rate, self.lefusion_counters, labels,
                                   watch=self.lefusion_online is not None)

    @property
    def _cpu_bf16(self) -> bool:
        """Whether steps run under bf16 autocast: a CPU device and ``cpu_bf16`` set (on CUDA, nnU-Net's own)."""
        return self.lefusion.cpu_bf16 and self.device.type == "cpu"

    def _autocast(self) -> contextlib.AbstractContextManager:
        return cpu_bf16_autocast(self._cpu_bf16)

    def on_train_start(self):
        super().on_train_start()
        if self._cpu_bf16:
            self.print_to_log_file(CPU_BF16_LOG_LINE + ("" if cpu_has_native_bf16() else
                                   "; this CPU has no native bf16 (AVX512-BF16 or AMX): expect it slower than fp32"))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._lefusion_step = 0
        if self.lefusion_online is not None:
            self.lefusion_online.epoch_start()

    def train_step(self, batch: dict) -> dict:
        start = time.perf_counter()
        with self._autocast():
            result = super().train_step(batch)
        self._lefusion_step += 1
        if self.lefusion_online is not None:
            try:
                self.lefusion_online.after_step(time.perf_counter() - start, self._lefusion_step,
                                                self.num_iterations_per_epoch, self.current_epoch)
            except LeFusionError as exc:
                raise LeFusionExit(f"online synthesis failed in epoch {self.current_epoch}: {exc}") from None
        self._lefusion_read_ids()
        return result

    def validation_step(self, batch: dict) -> dict:
        with self._autocast():
            return super().validation_step(batch)

    def _lefusion_read_ids(self) -> None:
        ids, lost = self.lefusion_counters.new_ids()
        for identifier in ids:
            self._lefusion_loaded[identifier] = self._lefusion_loaded.get(identifier, 0) + 1
        self._lefusion_lost += lost

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` summed over the DDP ranks (every rank calls this at the same point); as is without DDP."""
        if not self.is_ddp:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def on_epoch_end(self):
        self._lefusion_read_ids()
        counters = self.lefusion_counters
        loads, synthetic = counters.snapshot()
        voxels = counters.voxel_snapshot()
        seen = self._lefusion_seen
        before = seen["voxels"] or {k: dict.fromkeys(v, 0) for k, v in voxels.items()}
        labels = list(counters.labels)
        d_voxels = [voxels[k][lab] - before[k][lab] for k in ("real", "synthetic") for lab in labels]
        self._lefusion_seen = {"loads": loads, "synthetic": synthetic, "voxels": voxels}
        producer = self.lefusion_online
        online = [producer.made_epoch, producer.retired_epoch, producer.synthesis_time] if producer else [0, 0, 0.0]
        summed = self._sum_over_ranks([loads - seen["loads"], synthetic - seen["synthetic"], *d_voxels, *online])
        d_loads, d_syn = int(summed[0]), int(summed[1])
        d_voxels = [int(v) for v in summed[2:2 + 2 * len(labels)]]
        made, retired, synthesis_s = int(summed[-3]), int(summed[-2]), summed[-1]
        fraction = d_syn / d_loads if d_loads else 0.0
        entry = {"epoch": self.current_epoch, "loads": d_loads, "synthetic": d_syn, "fraction": round(fraction, 4),
                 "lesion_voxels": {"real": dict(zip(labels, d_voxels[:len(labels)])),
                                   "synthetic": dict(zip(labels, d_voxels[len(labels):]))}}
        self.print_to_log_file(f"LeFusion: {d_syn} of {d_loads} training-case loads were synthetic "
                               f"(realised fraction {fraction:.3f}, rate {self.lefusion.rate})")
        if labels:
            self.print_to_log_file("LeFusion: lesion voxels loaded, " + "; ".join(
                f"{k} " + ", ".join(f"label {lab}: {n}" for lab, n in entry["lesion_voxels"][k].items())
                for k in ("real", "synthetic")))
        if producer is not None:
            new = {i: n for i, n in self._lefusion_loaded.items() if i not in producer.initial_ids}
            self._lefusion_new_ids.update(new)
            pool_online, pool_total = producer.pool_sizes()
            entry.update({"produced": made, "retired": retired, "synthesis_s": round(synthesis_s, 2),
                          "pool_online": pool_online, "pool_total": pool_total,
                          "new_loads": sum(new.values()), "new_cases_loaded": len(new)})
            self.print_to_log_file(
                f"LeFusion online: {made} case(s) made this epoch ({synthesis_s:.1f} s), {retired} retired; pool "
                f"{pool_online}/{self.lefusion.pool_max} online cases, {pool_total} in all; {sum(new.values())} "
                f"load(s) of {len(new)} case(s) made during this training")
        self._lefusion_loaded = {}
        self.lefusion_epochs.append(entry)
        if self.local_rank == 0:
            stats = {"settings": self.lefusion.to_dict(), "epochs": self.lefusion_epochs,   # all ranks, all epochs
                     "total_loads": sum(e["loads"] for e in self.lefusion_epochs),
                     "total_synthetic": sum(e["synthetic"] for e in self.lefusion_epochs)}
            if producer is not None:
                stats["online"] = {"new_ids_loaded": sorted(self._lefusion_new_ids),
                                   "ids_lost": self._lefusion_lost, "initial_cases": len(producer.initial_ids)}
            atomic_write_text(Path(self.output_folder) / STATS_FILE, json.dumps(stats, indent=1))
        super().on_epoch_end()

    def on_train_end(self):
        try:
            super().on_train_end()
        finally:
            if self.lefusion_online is not None:
                self.lefusion_online.close()


class nnUNetTrainerLeFusion_r000(nnUNetTrainerLeFusion):
    """The control: the same code path with no synthetic case."""

    fixed_rate = 0.0


class nnUNetTrainerLeFusion_r025(nnUNetTrainerLeFusion):
    fixed_rate = 0.25


class nnUNetTrainerLeFusion_r050(nnUNetTrainerLeFusion):
    fixed_rate = 0.5


class nnUNetTrainerLeFusion_r100(nnUNetTrainerLeFusion):
    fixed_rate = 1.0


def _env_count(name: str, default: int) -> int:
    """A positive integer from environment variable ``name``; :class:`LeFusionExit` for anything else."""
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LeFusionExit(f"{name} must be a positive integer, got {text!r}")
    return value


class _ShortRun:
    """Mixin for CPU tests, demos and the benchmark: epochs/iterations from LEFUSION_EPOCHS/_ITERS/_VAL_ITERS
    (default 1/10/2), no test-time mirroring (validation and prediction 4-8x faster on CPU), and
    checkpoint_latest.pth every 5 epochs instead of 50, so that ``--c`` after an interruption loses at most 5."""

    save_every_epochs = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        counts = [_env_count(name, default) for name, default in
                  (("LEFUSION_EPOCHS", 1), ("LEFUSION_ITERS", 10), ("LEFUSION_VAL_ITERS", 2))]
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = counts
        self.save_every = self.save_every_epochs

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return configured


class nnUNetTrainerLeFusion_short(_ShortRun, nnUNetTrainerLeFusion):
    """A short run of :class:`nnUNetTrainerLeFusion`."""


class nnUNetTrainerLeFusion_r000_short(_ShortRun, nnUNetTrainerLeFusion_r000):
    """A short run of the control."""


TRAINERS = (nnUNetTrainerLeFusion, nnUNetTrainerLeFusion_r000, nnUNetTrainerLeFusion_r025,
            nnUNetTrainerLeFusion_r050, nnUNetTrainerLeFusion_r100, nnUNetTrainerLeFusion_short,
            nnUNetTrainerLeFusion_r000_short)
__all__ = [t.__name__ for t in TRAINERS]
