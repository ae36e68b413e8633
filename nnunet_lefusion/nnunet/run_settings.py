"""What a LeFusion training depends on, resolved once before nnU-Net writes anything, and recorded with its results.

:meth:`LeFusionRun.resolve` reads the settings (:func:`nnunet_lefusion.config.load_settings`), checks their cache and
generators against the dataset, plans, configuration and fold, and hashes the generator checkpoints. The record
(settings, resolved cache folder, generators with their sha256) is written to ``fold_X/lefusion_settings.json``;
a training continued there (``nnUNetv2_train --c``) under other settings is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from nnunet_lefusion.config import RESUMABLE, TrainerSettings, load_settings
from nnunet_lefusion.device import check_device
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import Manifest, atomic_write_text, default_cache_folder
from nnunet_lefusion.nnunet.context import DatasetContext, env_folder
from nnunet_lefusion.nnunet.online import online_generators, online_labels

SETTINGS_FILE = "lefusion_settings.json"


def file_sha256(path: str | Path) -> str | None:
    """The sha256 of a file's bytes; None if it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def hashed_generators(records: list[dict]) -> tuple[dict, ...]:
    """Role, path and sha256 of each generator file in ``records`` (``generator_records`` entries), once each."""
    roles = {}
    for record in records:
        roles.setdefault(record["path"], record["role"])
    return tuple({"role": role, "path": path, "sha256": file_sha256(path)} for path, role in roles.items())


@dataclass(frozen=True)
class LeFusionRun:
    """The settings of one training, with what they resolve to (none of it for a rate-0 control)."""

    settings: TrainerSettings
    ctx: DatasetContext | None = None
    cache: Path | None = None
    labels: LesionLabels | None = None       # online: the lesion labels synthesis uses
    generators: tuple[dict, ...] = ()

    @classmethod
    def resolve(cls, plans: dict, configuration: str, fold: int | str,
                fixed_rate: float | None = None) -> "LeFusionRun":
        """Read and check the settings (``fixed_rate``: the rate a trainer's name fixes); ``LeFusionError`` for a
        problem: bad settings, a cache of other plans, folds or labels, a missing or leaking generator."""
        env_folder("nnUNet_results")
        settings = load_settings(env_folder("nnUNet_preprocessed") / plans["dataset_name"] / "lefusion.yaml")
        if fixed_rate is not None:
            settings = replace(settings, rate=fixed_rate)
        if settings.rate == 0:
            return cls(settings)
        ctx = DatasetContext(plans["dataset_name"], configuration, fold, plans["plans_name"])
        ctx.check_single_stage()
        folder = Path(settings.cache) if settings.cache else default_cache_folder(ctx)
        if settings.mode == "cache":
            manifest = Manifest.load(folder)
            manifest.check_matches(ctx, ctx.split[0], folder)
            return cls(settings, ctx, folder, None,
                       hashed_generators([g for run in manifest.runs for g in run.get("generators", [])]))
        if settings.device:
            check_device(settings.device)
        labels = online_labels(ctx, folder)   # the cache (if any) fits; the generators fit the labels, saw no
        records = online_generators(ctx, labels, settings, settings.device or "cpu")[1]   # validation case
        return cls(settings, ctx, folder, labels, hashed_generators(records))

    def record(self) -> dict:
        """What ``lefusion_settings.json`` holds."""
        return {"settings": {**self.settings.to_dict(), "cache": str(self.cache) if self.cache else None},
                "generators": list(self.generators)}

    def write(self, fold_folder: str | Path) -> None:
        atomic_write_text(Path(fold_folder) / SETTINGS_FILE, json.dumps(self.record(), indent=1))

    def check_resume(self, fold_folder: str | Path) -> None:
        """``LeFusionError`` if ``fold_folder`` holds a training made under other settings (those of
        :data:`~nnunet_lefusion.config.RESUMABLE` may differ) or other generator files."""
        path = Path(fold_folder) / SETTINGS_FILE
        try:
            recorded = json.loads(path.read_text())
        except FileNotFoundError:
            return   # trained before settings were recorded
        except (OSError, ValueError) as exc:
            raise LeFusionError(f"cannot read {path} ({exc}): continue in a fresh results folder") from None
        now = self.record()
        before, after = recorded.get("settings", {}), now["settings"]
        changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in after
                   if k not in RESUMABLE and before.get(k) != after.get(k)]
        if [(g["path"], g["sha256"]) for g in recorded.get("generators", [])] != \
                [(g["path"], g["sha256"]) for g in now["generators"]]:
            changed.append("generator checkpoints (paths or sha256)")
        if changed:
            raise LeFusionError(f"{Path(fold_folder)} was trained under other LeFusion settings ({'; '.join(changed)}"
                                f"; see {path}): continue with the settings it was trained with, or train anew without "
                                "--c")
