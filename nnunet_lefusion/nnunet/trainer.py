"""``nnUNetTrainerLeFusion`` and its variants: nnU-Net's trainer with synthetic cases injected at a rate.

Each variant overrides one thing, like nnU-Net's own trainer variants. The constructor keeps nnU-Net's signature;
rate, cache and mode come from ``lefusion.yaml`` / ``$LEFUSION_CONFIG`` and ``LEFUSION_*`` variables
(see :mod:`nnunet_lefusion.config`), except in the ``_rXXX`` variants whose name fixes the rate.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_lefusion.config import TrainerSettings, load_settings
from nnunet_lefusion.errors import LeFusionError, LeFusionExit
from nnunet_lefusion.nnunet.cache import Manifest, atomic_write_text, default_cache_folder
from nnunet_lefusion.nnunet.context import DatasetContext, env_folder
from nnunet_lefusion.nnunet.dataset import LoadCounters, SyntheticMixDataset

STATS_FILE = "lefusion_stats.json"


class nnUNetTrainerLeFusion(nnUNetTrainer):
    """nnU-Net training where a loaded training case is replaced by a cached synthetic variant with prob. ``rate``."""

    fixed_rate: float | None = None  # set by the _rXXX variants: their name must tell the truth

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.lefusion = self.check_lefusion_input(plans, configuration, fold)  # before nnU-Net writes anything
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.lefusion_counters = LoadCounters()
        self.lefusion_epochs: list[dict] = []
        self._lefusion_seen = (0, 0)
        self._lefusion_base = (0, 0)  # loads and synthetic loads of the epochs before a resume (--c)

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
            if settings.rate > 0 and settings.mode == "cache":
                ctx = DatasetContext(plans["dataset_name"], configuration, fold, plans["plans_name"])
                ctx.check_single_stage()
                folder = Path(settings.cache) if settings.cache else default_cache_folder(ctx)
                Manifest.load(folder).check_matches(ctx, ctx.split[0], folder)
        except LeFusionError as exc:
            raise LeFusionExit(str(exc)) from None
        return settings

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._resume_lefusion_stats()

    def _resume_lefusion_stats(self) -> None:
        """``--c``: continue the statistics of the epochs the checkpoint holds (later epochs in the file, written
        after that checkpoint, are trained again and counted anew)."""
        path = Path(self.output_folder) / STATS_FILE
        self.lefusion_epochs, self._lefusion_base = [], (0, 0)
        try:
            earlier = [e for e in json.loads(path.read_text())["epochs"] if int(e["epoch"]) < self.current_epoch]
            self._lefusion_base = (sum(int(e["loads"]) for e in earlier), sum(int(e["synthetic"]) for e in earlier))
            self.lefusion_epochs = earlier
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.print_to_log_file(f"LeFusion: cannot read the statistics of the earlier epochs ({path}: "
                                   f"{type(exc).__name__}); counting from this epoch on")
        if self.lefusion_epochs:
            self.print_to_log_file(f"LeFusion: resumed the statistics of {len(self.lefusion_epochs)} earlier epochs")

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        folder, variants = None, {}
        if self.lefusion.rate > 0:
            ctx = DatasetContext(self.plans_manager.dataset_name, self.configuration_name, self.fold,
                                 self.plans_manager.plans_name)
            ctx.check_single_stage()
            folder = Path(self.lefusion.cache) if self.lefusion.cache else default_cache_folder(ctx)
            manifest = Manifest.load(folder)
            manifest.check_matches(ctx, list(dataset_tr.identifiers), folder)
            variants = manifest.variants_by_source()
            covered = sum(1 for i in dataset_tr.identifiers if variants.get(i))
            self.print_to_log_file(f"LeFusion: rate {self.lefusion.rate}, cache {folder}: {len(manifest.cases)} "
                                   f"synthetic cases for {covered}/{len(dataset_tr.identifiers)} training cases")
        else:
            self.print_to_log_file("LeFusion: rate 0, no synthetic cases (control run)")
        return SyntheticMixDataset(dataset_tr, folder, variants, self.lefusion.rate, self.lefusion_counters), \
            dataset_val

    def on_epoch_end(self):
        loads, synthetic = self.lefusion_counters.snapshot()
        d_loads, d_syn = loads - self._lefusion_seen[0], synthetic - self._lefusion_seen[1]
        self._lefusion_seen = (loads, synthetic)
        fraction = d_syn / d_loads if d_loads else 0.0
        self.print_to_log_file(f"LeFusion: {d_syn} of {d_loads} training-case loads were synthetic "
                               f"(realised fraction {fraction:.3f}, rate {self.lefusion.rate})")
        self.lefusion_epochs.append({"epoch": self.current_epoch, "loads": d_loads, "synthetic": d_syn})
        if self.local_rank == 0:
            stats = {"settings": self.lefusion.to_dict(), "epochs": self.lefusion_epochs,
                     "total_loads": self._lefusion_base[0] + loads,
                     "total_synthetic": self._lefusion_base[1] + synthetic}
            atomic_write_text(Path(self.output_folder) / STATS_FILE, json.dumps(stats, indent=1))
        super().on_epoch_end()


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
    """Mixin for CPU tests and demos: epochs/iterations from LEFUSION_EPOCHS/_ITERS/_VAL_ITERS (default 1/10/2),
    and no test-time mirroring (validation and prediction 4-8x faster on CPU)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("LEFUSION_EPOCHS", 1))
        self.num_iterations_per_epoch = int(os.environ.get("LEFUSION_ITERS", 10))
        self.num_val_iterations_per_epoch = int(os.environ.get("LEFUSION_VAL_ITERS", 2))

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
