"""Run-time settings of the LeFusion trainer: a YAML file with environment-variable overrides, read once into one
frozen :class:`TrainerSettings` (the trainer classes read no environment variable of their own)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from nnunet_lefusion.errors import LeFusionError

CONFIG_ENV = "LEFUSION_CONFIG"
MODES = ("cache", "online")
METHODS = ("copypaste", "lefusion")
SAMPLING = ("fast", "official")


@dataclass(frozen=True)
class TrainerSettings:
    """What the trainer injects: ``rate`` is the probability that a loaded training case is synthetic.

    ``mode``: ``cache`` reads a pre-synthesized cache; ``online`` also fills that cache during training (the
    trainer's main process synthesizes ``online_cases_per_epoch`` cases per epoch, at most ``online_time_share`` of
    the training time, into a pool of at most ``pool_max`` cases). The synthesis keys mirror
    ``nnUNetv2_lefusion_synthesize`` (``--method``, ``--checkpoint``, ``--sampling``, ``--strided-steps``,
    ``--mask-generator``, ``--mix``, ``--target-share``, ``--candidates``, ``--device``, ``--seed``).
    ``cpu_bf16``: on a CPU device, train and validate under bf16 autocast, as nnU-Net autocasts on CUDA (it runs
    in fp32 on a CPU); about 1.9x faster per iteration on CPUs with AMX, slower than fp32 on CPUs that only emulate
    bf16 (no AVX512-BF16 or AMX).
    ``rare_focus``: the probability that a real training-case load is redirected to a training case holding the
    rarest lesion label (class rebalancing with real cases only; the benchmark's ``real_balanced`` arm).
    ``epochs`` / ``iterations`` / ``val_iterations``: the schedule of the short-run trainers (``*_short``: tests,
    demo, benchmark presets); the other trainers keep nnU-Net's.
    """

    rate: float = 0.5
    mode: str = "cache"
    cache: str | None = None  # folder of a synthetic cache; None: the default one of the dataset/config/fold
    # online mode: the budget and the pool
    online_cases_per_epoch: int = 4  # synthetic cases per epoch (all GPUs together); 0: only the time share limits
    online_time_share: float = 0.0  # at most this share of the wall time goes to synthesis; 0: no time limit
    pool_max: int = 64  # online cases this training keeps (split over ranks); its oldest are retired beyond it
    # online mode: what is synthesized (as nnUNetv2_lefusion_synthesize)
    method: str = "copypaste"
    checkpoint: str | None = None
    clusters: str | None = None  # official histogram-cluster JSON (needed with an official checkpoint)
    sampling: str = "fast"
    strided_steps: int | None = None  # fast sampling: strided timesteps walked (None: the mode's own 45)
    mask_generator: str | None = None
    histogram_matching: bool | None = None  # None: unless the sampler has a level offset
    mix: str | None = None
    target_share: str | None = None
    candidates: int = 8
    device: str | None = None  # None: the trainer's device
    seed: int = 0
    cpu_bf16: bool = False
    rare_focus: float = 0.0
    # the short-run trainers' schedule
    epochs: int = 1
    iterations: int = 10
    val_iterations: int = 2

    def validate(self) -> "TrainerSettings":
        """These settings, checked; ``LeFusionError`` naming the first bad one."""
        for key in ("rate", "rare_focus"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise LeFusionError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.mode not in MODES:
            raise LeFusionError(f"mode must be one of {MODES}, got {self.mode!r}")
        for key in ("epochs", "iterations", "val_iterations"):
            if getattr(self, key) < 1:
                raise LeFusionError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.online_cases_per_epoch < 0:
            raise LeFusionError(f"online_cases_per_epoch must be >= 0, got {self.online_cases_per_epoch}")
        if not 0.0 <= self.online_time_share < 1.0:
            raise LeFusionError(f"online_time_share must be in [0, 1), got {self.online_time_share}")
        if self.mode == "online" and self.online_cases_per_epoch == 0 and self.online_time_share == 0:
            raise LeFusionError("online_cases_per_epoch and online_time_share are both 0: set at least one budget")
        if self.seed < 0:
            raise LeFusionError(f"seed must be >= 0, got {self.seed}")
        if self.pool_max < 1:
            raise LeFusionError(f"pool_max must be >= 1, got {self.pool_max}")
        if self.method not in METHODS:
            raise LeFusionError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.sampling not in SAMPLING:
            raise LeFusionError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if self.strided_steps is not None and (self.strided_steps < 1 or self.sampling != "fast"):
            raise LeFusionError(f"strided_steps must be >= 1 and apply to the fast sampling only, got "
                                f"{self.strided_steps} with sampling {self.sampling}")
        self.synthesis_plan()
        return self

    def synthesis_plan(self):
        """The :class:`SynthesisPlan` of ``mix`` / ``target_share`` / ``candidates`` (None: the method's default)."""
        from nnunet_lefusion.synthesis.plan import SynthesisPlan

        if not self.mix and not self.target_share:
            if self.candidates < 1:
                raise LeFusionError(f"candidates must be >= 1, got {self.candidates}")
            return None
        return SynthesisPlan.parse(self.mix, self.target_share, self.candidates)

    def to_dict(self) -> dict:
        return asdict(self)


def _bool(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_bool.__name__ = "bool"
_ENV = {"rate": ("LEFUSION_RATE", float), "mode": ("LEFUSION_MODE", str), "cache": ("LEFUSION_CACHE", str),
        "online_cases_per_epoch": ("LEFUSION_CASES_PER_EPOCH", int),
        "online_time_share": ("LEFUSION_TIME_SHARE", float), "pool_max": ("LEFUSION_POOL_MAX", int),
        "method": ("LEFUSION_METHOD", str), "checkpoint": ("LEFUSION_CHECKPOINT", str),
        "clusters": ("LEFUSION_CLUSTERS", str),
        "sampling": ("LEFUSION_SAMPLING", str), "strided_steps": ("LEFUSION_STRIDED_STEPS", int),
        "mask_generator": ("LEFUSION_MASK_GENERATOR", str),
        "histogram_matching": ("LEFUSION_HISTOGRAM_MATCHING", _bool), "mix": ("LEFUSION_MIX", str),
        "target_share": ("LEFUSION_TARGET_SHARE", str), "candidates": ("LEFUSION_CANDIDATES", int),
        "device": ("LEFUSION_DEVICE", str), "seed": ("LEFUSION_SEED", int), "cpu_bf16": ("LEFUSION_CPU_BF16", _bool),
        "rare_focus": ("LEFUSION_RARE_FOCUS", float),
        "epochs": ("LEFUSION_EPOCHS", int), "iterations": ("LEFUSION_ITERS", int),
        "val_iterations": ("LEFUSION_VAL_ITERS", int)}
ENV_VARIABLES = tuple(env for env, _ in _ENV.values()) + (CONFIG_ENV,)
# what may differ when a training is continued (nnUNetv2_train --c): how and how long it runs, not what it learns from
RESUMABLE = ("device", "cpu_bf16", "epochs", "iterations", "val_iterations")


def _typed(key: str, value, path) -> object:
    """A YAML value checked against the key's type (an integer may stand for a float)."""
    if value is None:
        return None
    cast = _ENV[key][1]
    if cast is str:
        if isinstance(value, dict) and key in ("mix", "target_share"):  # YAML mapping {retexture: 0.5, ...}
            return ",".join(f"{k}={v}" for k, v in value.items())
        if isinstance(value, (dict, list)):
            raise LeFusionError(f"LeFusion config {path}: {key} must be a string, got {value!r}")
        return str(value)
    ok = {float: isinstance(value, (int, float)) and not isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool), _bool: isinstance(value, bool)}[cast]
    if not ok:
        raise LeFusionError(f"LeFusion config {path}: {key} must be a {cast.__name__}, got {value!r}")
    return float(value) if cast is float else value


def load_settings(default_file: str | os.PathLike | None = None) -> TrainerSettings:
    """Settings from ``$LEFUSION_CONFIG`` (else ``default_file`` if it exists), then ``LEFUSION_*`` variables."""
    values: dict = {}
    path = os.environ.get(CONFIG_ENV) or (default_file if default_file and Path(default_file).is_file() else None)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise LeFusionError(f"cannot read LeFusion config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise LeFusionError(f"LeFusion config {path} must be a mapping, got {type(loaded).__name__}")
        allowed = {f.name for f in fields(TrainerSettings)}
        unknown = set(loaded) - allowed
        if unknown:
            raise LeFusionError(f"unknown keys in LeFusion config {path}: {sorted(unknown)} "
                                f"(allowed: {sorted(allowed)})")
        for key, value in loaded.items():
            values[key] = _typed(key, value, path)
    for key, (env, cast) in _ENV.items():
        if env in os.environ:
            try:
                values[key] = cast(os.environ[env])
            except ValueError:
                raise LeFusionError(f"{env}={os.environ[env]!r} is not a valid {cast.__name__}") from None
    try:
        settings = TrainerSettings(**values)
    except TypeError as exc:
        raise LeFusionError(f"bad LeFusion settings: {exc}") from None
    return settings.validate()


def write_settings(settings: TrainerSettings, path: str | os.PathLike) -> Path:
    """Write ``settings`` as the YAML file that :func:`load_settings` reads (``LEFUSION_CONFIG=path``); its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings.validate().to_dict(), sort_keys=False))
    return path
