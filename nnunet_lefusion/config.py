"""Run-time settings of the LeFusion trainer: a YAML file with environment-variable overrides."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from nnunet_lefusion.errors import LeFusionError

CONFIG_ENV = "LEFUSION_CONFIG"
MODES = ("cache",)


@dataclass
class TrainerSettings:
    """What the trainer injects: ``rate`` is the probability that a loaded training case is synthetic."""

    rate: float = 0.5
    mode: str = "cache"
    cache: str | None = None  # folder of a synthetic cache; None: the default one of the dataset/config/fold

    def validate(self) -> "TrainerSettings":
        if not 0.0 <= self.rate <= 1.0:
            raise LeFusionError(f"rate must be in [0, 1], got {self.rate}")
        if self.mode not in MODES:
            raise LeFusionError(f"mode must be one of {MODES}, got {self.mode!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


_ENV = {"rate": ("LEFUSION_RATE", float), "mode": ("LEFUSION_MODE", str), "cache": ("LEFUSION_CACHE", str)}


def load_settings(default_file: str | os.PathLike | None = None) -> TrainerSettings:
    """Settings from ``$LEFUSION_CONFIG`` (else ``default_file`` if it exists), then ``LEFUSION_*`` variables."""
    values: dict = {}
    path = os.environ.get(CONFIG_ENV) or (default_file if default_file and Path(default_file).is_file() else None)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise LeFusionError(f"cannot read LeFusion config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise LeFusionError(f"LeFusion config {path} must be a mapping, got {type(loaded).__name__}")
        allowed = {f.name for f in fields(TrainerSettings)}
        unknown = set(loaded) - allowed
        if unknown:
            raise LeFusionError(f"unknown keys in LeFusion config {path}: {sorted(unknown)} (allowed: {sorted(allowed)})")
        values.update(loaded)
    for key, (env, cast) in _ENV.items():
        if env in os.environ:
            try:
                values[key] = cast(os.environ[env])
            except ValueError:
                raise LeFusionError(f"{env}={os.environ[env]!r} is not a valid {cast.__name__}") from None
    return TrainerSettings(**values).validate()
