"""``nnUNetTrainerLeFusion`` and its variants: nnU-Net's trainer with synthetic cases injected at a rate.

Each variant overrides one thing, like nnU-Net's own trainer variants. The constructor keeps nnU-Net's signature;
everything LeFusion depends on is read once into :class:`~nnunet_lefusion.nnunet.run_settings.LeFusionRun` (from
``lefusion.yaml`` / ``$LEFUSION_CONFIG`` and ``LEFUSION_*`` variables, see :mod:`nnunet_lefusion.config`), except
in the ``_rXXX`` variants whose name fixes the rate, and recorded in ``fold_X/lefusion_settings.json``. The
synthetic cases come from a source (:mod:`nnunet_lefusion.nnunet.source`: a cache, or online synthesis into it);
the counts go to :class:`~nnunet_lefusion.nnunet.stats.LeFusionStats`.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_lefusion.errors import LeFusionError, LeFusionExit
from nnunet_lefusion.nnunet.cache import Manifest, recorded_labels
from nnunet_lefusion.nnunet.dataset import SyntheticMixDataset
from nnunet_lefusion.nnunet.run_settings import LeFusionRun
from nnunet_lefusion.nnunet.source import synthetic_source
from nnunet_lefusion.nnunet.stats import LeFusionStats
from nnunet_lefusion.precision import CPU_BF16_LOG_LINE, cpu_bf16_autocast, cpu_has_native_bf16


class nnUNetTrainerLeFusion(nnUNetTrainer):
    """nnU-Net training where a loaded training case is replaced by a synthetic case with prob. ``rate``."""

    fixed_rate: float | None = None  # set by the _rXXX variants: their name must tell the truth

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.lefusion_run = self.check_lefusion_input(plans, configuration, fold)  # before nnU-Net writes anything
        self.lefusion = self.lefusion_run.settings
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lefusion_stats = LeFusionStats(self.lefusion, self.print_to_log_file)
        self.lefusion_source = None  # the synthetic-case source, once the datasets are built
        self._lefusion_step = 0

    @classmethod
    def check_lefusion_input(cls, plans: dict, configuration: str, fold: int | str) -> LeFusionRun:
        """The settings, checked against this dataset, plans, configuration and fold before nnU-Net creates the
        output folder; a problem is one ``nnUNetv2_train: error: ...`` line and exit code 2 (:class:`LeFusionExit`)."""
        try:
            return LeFusionRun.resolve(plans, configuration, fold, cls.fixed_rate)
        except LeFusionError as exc:
            raise LeFusionExit(str(exc)) from None

    @property
    def lefusion_counters(self):
        """The load counters shared with the data workers."""
        return self.lefusion_stats.counters

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary name and renamed: a run killed while saving keeps its
        previous checkpoint intact, so ``--c`` can continue (nnU-Net writes in place)."""
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.isfile(partial):  # rank 0 with checkpointing enabled wrote it
            os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """``--c`` / ``--val``: refused under other settings than the folder was trained with."""
        try:
            self.lefusion_run.check_resume(self.output_folder)
        except LeFusionError as exc:
            raise LeFusionExit(f"--c refused: {exc}") from None
        super().load_checkpoint(filename_or_checkpoint)
        self.lefusion_stats.resume(self.output_folder, self.current_epoch)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        try:
            return self._with_synthetic_cases(dataset_tr), dataset_val
        except LeFusionError as exc:  # a cache or generator that changed since the check at construction
            raise LeFusionExit(str(exc)) from None

    def _with_synthetic_cases(self, dataset_tr) -> SyntheticMixDataset:
        run, variants, manifest = self.lefusion_run, {}, None
        if self.lefusion.rate > 0:
            rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if self.is_ddp \
                else (0, 1)
            self.lefusion_source = synthetic_source(self.lefusion, run.ctx, run.cache, run.labels, str(self.device),
                                                    rank, world, self.print_to_log_file)
            manifest = self.lefusion_source.start()
            manifest.check_matches(run.ctx, list(dataset_tr.identifiers), run.cache)
            variants = manifest.variants_by_source()
            covered = sum(1 for i in dataset_tr.identifiers if variants.get(i))
            self.print_to_log_file(f"LeFusion: mode {self.lefusion.mode}, rate {self.lefusion.rate}, cache "
                                   f"{run.cache}: {len(manifest.cases)} synthetic cases for {covered}/"
                                   f"{len(dataset_tr.identifiers)} training cases")
        else:
            self.print_to_log_file("LeFusion: rate 0, no synthetic cases (control run)")
        labels = self._lesion_labels(manifest)
        counters = self.lefusion_stats.count_labels(labels)
        dataset = SyntheticMixDataset(dataset_tr, run.cache, variants, self.lefusion.rate, counters, labels,
                                      watch=self.lefusion_source is not None and self.lefusion_source.watch,
                                      rare_focus=self.lefusion.rare_focus)
        if self.lefusion.rare_focus > 0:
            self.print_to_log_file(f"LeFusion: rare_focus {self.lefusion.rare_focus}: a real load goes with that "
                                   f"probability to one of the {len(dataset.rare_cases)} training cases holding the "
                                   f"rarest lesion label")
        return dataset

    def _lesion_labels(self, manifest: Manifest | None):
        """The cache's lesion labels, else those named in dataset.json; None if there are none (no voxel counts)."""
        try:
            return recorded_labels(manifest, self.dataset_json)
        except LeFusionError as exc:
            self.print_to_log_file(f"LeFusion: no lesion voxel counts ({exc})")
            return None

    @property
    def _cpu_bf16(self) -> bool:
        """Whether steps run under bf16 autocast: a CPU device and ``cpu_bf16`` set (on CUDA, nnU-Net's own)."""
        return self.lefusion.cpu_bf16 and self.device.type == "cpu"

    def _autocast(self) -> contextlib.AbstractContextManager:
        return cpu_bf16_autocast(self._cpu_bf16)

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            self.lefusion_run.write(self.output_folder)
        if self._cpu_bf16:
            self.print_to_log_file(CPU_BF16_LOG_LINE + ("" if cpu_has_native_bf16() else
                                   "; this CPU has no native bf16 (AVX512-BF16 or AMX): expect it slower than fp32"))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._lefusion_step = 0
        if self.lefusion_source is not None:
            self.lefusion_source.epoch_start()

    def train_step(self, batch: dict) -> dict:
        start = time.perf_counter()
        with self._autocast():
            result = super().train_step(batch)
        self._lefusion_step += 1
        if self.lefusion_source is not None:
            self.lefusion_source.after_step(time.perf_counter() - start, self._lefusion_step,
                                            self.num_iterations_per_epoch, self.current_epoch)
        self.lefusion_stats.read_ids()
        return result

    def validation_step(self, batch: dict) -> dict:
        with self._autocast():
            return super().validation_step(batch)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` summed over the DDP ranks (every rank calls this at the same point); as is without DDP."""
        if not self.is_ddp:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def on_epoch_end(self):
        self.lefusion_stats.end_epoch(self.current_epoch, self.lefusion_source, self._sum_over_ranks)
        if self.local_rank == 0:
            self.lefusion_stats.write(self.output_folder, self.lefusion_source)
        super().on_epoch_end()

    def on_train_end(self):
        try:
            super().on_train_end()
        finally:
            if self.lefusion_source is not None:
                self.lefusion_source.close()


class nnUNetTrainerLeFusion_r000(nnUNetTrainerLeFusion):
    """The control: the same code path with no synthetic case."""

    fixed_rate = 0.0


class nnUNetTrainerLeFusion_r025(nnUNetTrainerLeFusion):
    fixed_rate = 0.25


class nnUNetTrainerLeFusion_r050(nnUNetTrainerLeFusion):
    fixed_rate = 0.5


class nnUNetTrainerLeFusion_r100(nnUNetTrainerLeFusion):
    fixed_rate = 1.0


class _ShortRun:
    """Mixin for CPU tests, demos and the benchmark: the settings' ``epochs`` / ``iterations`` / ``val_iterations``
    (default 1/10/2), no test-time mirroring (validation and prediction 4-8x faster on CPU), and
    checkpoint_latest.pth every 5 epochs instead of 50, so that ``--c`` after an interruption loses at most 5."""

    save_every_epochs = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.lefusion.epochs
        self.num_iterations_per_epoch = self.lefusion.iterations
        self.num_val_iterations_per_epoch = self.lefusion.val_iterations
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
