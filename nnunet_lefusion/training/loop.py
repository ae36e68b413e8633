"""One generic diffusion training loop: Adam, EMA, gradient accumulation, checkpoints and exact resume.

It serves the LeFusion texture sampler (``nnUNetv2_lefusion_train_sampler``) and the mask generator
(``nnUNetv2_lefusion_train_masks``) alike. How to call it::

    from nnunet_lefusion.training.loop import TrainConfig, train

    def make_batch(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        # Draw ONE batch with ``rng`` only (which cases, flips, ...); CPU tensors are fine, the loop moves
        # every tensor in a dict / list / tuple to the training device.
        ...

    def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
        # A scalar loss. Torch randomness (t, noise) may use the global torch RNG: the loop seeds it.
        return training_loss(model, schedule, batch["x0"], batch["masks"], batch["cond"])

    meta = CheckpointMeta(lesion_labels=[3, 4], roi_size=[32, 64, 64], extras={"kind": "lefusion_masks", ...})
    result = train(model, loss_fn, make_batch, out_dir, meta,
                   config=TrainConfig(steps=20_000, batch_size=4, checkpoint_every=500, seed=0),
                   resume=args.resume)  # model: a Unet3D (the checkpoint format stores Unet3D weights)
    # out_dir/checkpoint_latest.pt (every checkpoint_every steps), checkpoint_final.pt, training_log.txt

Determinism: the randomness of optimisation step k (micro-batch j) comes from (seed, k, j) only: the loop hands
``make_batch`` a ``numpy.random.Generator`` seeded with ``[seed, k, j]`` and seeds the global torch RNG from the
same triple before ``loss_fn``. So a run stopped after a checkpoint and resumed with ``resume=True`` replays the
remaining steps exactly as an uninterrupted run would (bit-identical weights on CPU; on CUDA up to the
non-determinism of its kernels), and no RNG state needs to be stored.

Checkpoints are written by ``nnunet_lefusion.model.checkpoint`` in the official layout (``step``, ``model``,
``ema``, ``scaler``) with our ``lefusion_meta`` (the model config plus the ``meta`` argument); the optimizer state
and the training settings go into the checkpoint's optimizer slot (``{"optimizer": ..., "train_config": ...}``).
Resuming from a checkpoint whose model config or metadata differ is refused with a ``LeFusionError``.

EMA (official: decay 0.995, updated every 10 steps, reset to the online weights until step 2000): with
``ema_every`` / ``ema_start`` left at ``None`` they scale with ``steps`` so that short CPU runs still average
(see :meth:`TrainConfig.resolved`); a resumed run keeps the EMA schedule it started with, so resuming with a larger
``steps`` gives the same online weights as a straight run, and the same EMA weights when the automatic schedule
of both lengths coincides.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model.checkpoint import Checkpoint, CheckpointMeta, load_checkpoint, save_checkpoint
from nnunet_lefusion.model.unet3d import Unet3D
from nnunet_lefusion.nnunet.provenance import describe

LATEST = "checkpoint_latest.pt"
FINAL = "checkpoint_final.pt"
LOG_NAME = "training_log.txt"
OFFICIAL_EMA_START = 2000
OFFICIAL_EMA_EVERY = 10

Batch = Any
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
MakeBatch = Callable[[np.random.Generator], Batch]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``batch_size`` is recorded for the log; ``make_batch`` decides the real size.

    ``ema_every`` / ``ema_start`` = ``None``: official values (10 / 2000) for runs of >= 20,000 steps, else
    scaled down with the run length (every max(1, steps // 2000) steps, reset until steps // 10).
    ``keep_every``: also keep ``checkpoint_step<k>.pt`` every that many steps (0 = never).
    """

    steps: int
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    checkpoint_every: int = 1000
    keep_every: int = 0
    log_every: int = 10
    ema_decay: float = 0.995
    ema_every: int | None = None
    ema_start: int | None = None
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the EMA schedule filled in and every value checked (``LeFusionError`` if invalid)."""
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LeFusionError(f"training setting '{name}' must be a positive integer, got {value!r}.")
        if self.keep_every < 0 or self.seed < 0:
            raise LeFusionError(f"training settings 'keep_every' and 'seed' must be >= 0, got {self.keep_every} and "
                                f"{self.seed}.")
        if not self.lr > 0 or not 0.0 <= self.ema_decay < 1.0:
            raise LeFusionError(f"need lr > 0 and 0 <= ema_decay < 1, got lr {self.lr}, ema_decay {self.ema_decay}.")
        long_run = self.steps >= OFFICIAL_EMA_EVERY * OFFICIAL_EMA_START
        every = self.ema_every if self.ema_every is not None else (
            OFFICIAL_EMA_EVERY if long_run else max(1, self.steps // OFFICIAL_EMA_START))
        start = self.ema_start if self.ema_start is not None else (
            OFFICIAL_EMA_START if long_run else self.steps // 10)
        if every < 1 or start < 0:
            raise LeFusionError(f"need ema_every >= 1 and ema_start >= 0, got {every} and {start}.")
        return replace(self, ema_every=every, ema_start=start)


@dataclass
class TrainResult:
    """What one call of :func:`train` did: the final step, this session's per-step losses, the final file."""

    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        done = self.step - self.start_step
        return done / self.seconds if self.seconds > 0 else float("nan")


def step_seed(seed: int, step: int, micro: int) -> list[int]:
    """The seed sequence of optimisation step ``step``, micro-batch ``micro``."""
    return [int(seed), int(step), int(micro)]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor inside nested dicts / lists / tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Ema:
    """Exponential moving average of a model's weights, on the official schedule (reset, then averaged)."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int, start: int) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.start = decay, every, start

    @torch.no_grad()
    def after_step(self, online: torch.nn.Module, step: int) -> None:
        """Call with the number of completed steps; acts every ``every`` steps (official ``step_ema``)."""
        if step % self.every:
            return
        ema_state, online_state = self.model.state_dict(), online.state_dict()
        for name, value in online_state.items():
            target = ema_state[name]
            if step < self.start or not target.is_floating_point():
                target.copy_(value)
            else:
                target.lerp_(value, 1.0 - self.decay)


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a ``LeFusionError`` for an unknown name or CUDA missing."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LeFusionError(f"device '{name}' was requested but CUDA is not available here; use cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LeFusionError(f"unknown device '{name}'; use cpu or cuda.") from None


def _read_resume(path: Path, model: Unet3D, meta: CheckpointMeta) -> Checkpoint:
    """The checkpoint to resume from, refused if it holds another network or metadata, or no optimizer state."""
    loaded = load_checkpoint(path)
    stored = loaded.meta.to_dict() if loaded.meta is not None else {}
    seen = stored.get("training_data")
    if seen is not None and meta.training_data is not None and seen != meta.training_data:
        raise LeFusionError(f"cannot resume from {path}: it was trained on {describe(seen)}, not on "
                            f"{describe(meta.training_data)}; use the same -f or another output folder.")
    differences = sorted(k for k, v in meta.to_dict().items()
                         if stored.get(k) != v and not (k == "training_data" and seen is None))
    if loaded.config != model.config:
        differences.insert(0, "model config")
    if differences:
        raise LeFusionError(f"cannot resume from {path}: it was trained with different settings "
                            f"({', '.join(differences)}); use another output folder or drop --resume.")
    if not isinstance(loaded.optimizer_state, dict) or "optimizer" not in loaded.optimizer_state:
        raise LeFusionError(f"cannot resume from {path}: it holds no optimizer state (not written by this trainer).")
    return loaded


def _keep_ema_schedule(config: TrainConfig, stored: dict) -> TrainConfig:
    """A resumed run keeps the EMA schedule it started with (the automatic one depends on ``steps``)."""
    return replace(config, ema_every=config.ema_every if config.ema_every is not None else stored["ema_every"],
                   ema_start=config.ema_start if config.ema_start is not None else stored["ema_start"])


def _save(path: Path, model: Unet3D, ema: Ema, optimizer: torch.optim.Optimizer, step: int,
          meta: CheckpointMeta, config: TrainConfig, num_timesteps: int) -> None:
    save_checkpoint(path, model, ema=ema.model, step=step, num_steps=num_timesteps, meta=meta,
                    optimizer_state={"optimizer": optimizer.state_dict(), "train_config": asdict(config)})


def train(model: Unet3D, loss_fn: LossFn, make_batch: MakeBatch, out_dir: str | Path, meta: CheckpointMeta,
          config: TrainConfig, resume: bool = False, num_timesteps: int = 300) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` optimisation steps (counted from zero, across resumes).

    Each step averages ``loss_fn`` over ``config.grad_accum`` micro-batches from ``make_batch``. Writes
    ``out_dir/checkpoint_latest.pt`` every ``checkpoint_every`` steps, ``checkpoint_final.pt`` at the end and
    one line per ``log_every`` steps to ``training_log.txt``. ``resume=True`` continues from
    ``checkpoint_latest.pt`` when it exists (a finished run returns at once). ``num_timesteps`` is the length of
    the diffusion schedule written into the checkpoint (official 300). The model stays on the device.
    """
    device = resolve_device(config.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = None
    if resume and (out / LATEST).is_file():
        loaded = _read_resume(out / LATEST, model, meta)
        config = _keep_ema_schedule(config, loaded.optimizer_state["train_config"])
    elif not resume and (out / LATEST).exists():
        raise LeFusionError(f"{out} already holds a training run; pass --resume to continue it, "
                            f"or choose another output folder.")
    config = config.resolved()
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start = 0
    if loaded is not None:
        model.load_state_dict(loaded.model_state)
        optimizer.load_state_dict(loaded.optimizer_state["optimizer"])
        start = int(loaded.step)
    ema = Ema(model, config.ema_decay, config.ema_every, config.ema_start)
    if loaded is not None and loaded.ema_state is not None:
        ema.model.load_state_dict(loaded.ema_state)
    if start > config.steps:
        raise LeFusionError(f"the checkpoint in {out} is at step {start}, beyond the requested {config.steps} steps.")
    log_file = (out / LOG_NAME).open("a")
    result = TrainResult(step=start, start_step=start)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext())
    begin = time.perf_counter()
    window: list[float] = []
    try:
        if start == 0:
            log_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} config {asdict(config)}\n")
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="training",
                   disable=not config.progress, dynamic_ncols=True)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(config.grad_accum):
                seeds = step_seed(config.seed, step, micro)
                batch = to_device(make_batch(np.random.default_rng(seeds)), device)
                torch.manual_seed(int(np.random.SeedSequence(seeds).generate_state(1, np.uint64)[0] >> 1))
                with autocast:
                    loss = loss_fn(model, batch) / config.grad_accum
                if not torch.isfinite(loss):
                    raise LeFusionError(f"the training loss became {loss.item()} at step {step + 1}; "
                                        f"lower the learning rate or check the data.")
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            done = step + 1
            ema.after_step(model, done)
            result.step = done
            result.losses.append(total)
            window.append(total)
            bar.set_postfix(loss=f"{np.mean(window[-config.log_every:]):.4f}")
            if done % config.log_every == 0 or done == config.steps:
                rate = (done - start) / max(time.perf_counter() - begin, 1e-9)
                line = f"step {done} loss {np.mean(window):.6f} steps/s {rate:.4f}"
                log_file.write(line + "\n")
                log_file.flush()
                window = []
            if done % config.checkpoint_every == 0 and done < config.steps:
                _save(out / LATEST, model, ema, optimizer, done, meta, config, num_timesteps)
                if config.keep_every and done % config.keep_every == 0:
                    _save(out / f"checkpoint_step{done}.pt", model, ema, optimizer, done, meta, config, num_timesteps)
        bar.close()
        if result.step > start or not (out / FINAL).is_file():
            _save(out / LATEST, model, ema, optimizer, result.step, meta, config, num_timesteps)
            _save(out / FINAL, model, ema, optimizer, result.step, meta, config, num_timesteps)
    finally:
        log_file.close()
    result.checkpoint = out / FINAL
    result.seconds = time.perf_counter() - begin
    return result

