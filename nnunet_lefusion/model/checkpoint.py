"""Denoiser checkpoints: read official LeFusion files, write files the official code can load too.

File layout (official ``Trainer.save``): ``{'step', 'model', 'ema', 'scaler'}``, where ``model`` and ``ema``
are state dicts of the diffusion wrapper: the network under ``denoise_fn.`` (``denoise_fn.module.`` when it
was trained with DataParallel) plus the 12 schedule buffers at the top level. Our files add
``lefusion_meta`` (model config and data settings) and, for resuming, ``lefusion_optimizer``.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from nnunet_lefusion.diffusion.schedule import BUFFER_NAMES, CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model.config import ModelConfig
from nnunet_lefusion.model.unet3d import Unet3D

FORMAT_VERSION = 1
META_KEY = "lefusion_meta"
OPTIMIZER_KEY = "lefusion_optimizer"
NETWORK_PREFIX = "denoise_fn."
PARALLEL_PREFIX = "module."
WEIGHTS = ("ema", "model")


@dataclass
class CheckpointMeta:
    """What our checkpoints record besides the weights and the model config; plain Python types only.

    ``lesion_labels``: the lesion label values (or a dict describing them); ``roi_size``: (D, H, W);
    ``intensity``: the mapping of image values to [-1, 1]; ``histogram_clusters``: the histogram centres used
    as conditions (lists, or a dict); ``extras``: free-form; ``training_data``: the cases the network was trained
    on, ``{"dataset", "fold", "cases": {identifier: label-file hash}}`` (``nnunet.provenance``; None: unrecorded).
    """

    lesion_labels: list[int] | dict[str, Any] = field(default_factory=list)
    roi_size: list[int] | None = None
    intensity: dict[str, Any] = field(default_factory=dict)
    histogram_clusters: list[Any] | dict[str, Any] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        _check_plain(values, "lefusion_meta")
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CheckpointMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Checkpoint:
    """A checkpoint read from disk: network state dicts without prefixes, plus what came with them."""

    config: ModelConfig
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    step: int
    num_steps: int
    meta: CheckpointMeta | None  # None for official checkpoints
    optimizer_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] = field(default_factory=dict)

    def build(self, weights: str = "ema") -> Unet3D:
        """The denoiser with the ``ema`` (default) or ``model`` weights, in eval mode, on the CPU."""
        if weights not in WEIGHTS:
            raise LeFusionError(f"Checkpoint weights must be one of {WEIGHTS}, got {weights!r}.")
        state = self.ema_state if weights == "ema" else self.model_state
        if state is None:
            raise LeFusionError(f"This checkpoint holds no '{weights}' weights; use weights='model'.")
        with torch.device("meta"):
            model = self.config.build()
        model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
        model.fused = model.fused  # lay the loaded weights out for the current execution path
        return model.eval()


def save_checkpoint(path: str | os.PathLike, model: Unet3D, *, ema: Unet3D | None = None, step: int = 0,
                    num_steps: int = 300, meta: CheckpointMeta | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    scaler_state: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` (and its EMA copy, default: the same weights, stored once) in the official layout plus our
    metadata; ``dtype`` (e.g. ``torch.float16``) stores the network weights in that type (they load as float32).

    The file is written under a temporary name and renamed into place.
    """
    schedule = CosineSchedule(num_steps).official_buffers()

    def wrapped(net: Unet3D) -> dict[str, torch.Tensor]:
        state = {NETWORK_PREFIX + k: v.detach().cpu().to(dtype if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in net.state_dict().items()}
        return {**schedule, **state}

    if ema is not None and ema.config != model.config:
        raise LeFusionError("The EMA network of a checkpoint must have the same model config as the network.")
    meta_dict = {"format_version": FORMAT_VERSION, "model_config": model.config.to_dict(),
                 **(meta or CheckpointMeta()).to_dict()}
    model_state = wrapped(model)
    payload: dict[str, Any] = {
        "step": int(step),
        "model": model_state,
        "ema": wrapped(ema) if ema is not None else model_state,
        "scaler": scaler_state or {},
        META_KEY: meta_dict,
    }
    if optimizer_state is not None:
        payload[OPTIMIZER_KEY] = optimizer_state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, *, channels: int | None = None,
                    config: ModelConfig | None = None) -> Checkpoint:
    """Read an official or our own checkpoint and check it against the network it describes.

    The model config comes from ``config`` if given, else from our metadata, else it is inferred from the
    state-dict shapes. ``channels`` (image channels the caller will feed) is checked when given.
    """
    path = Path(path)
    payload = _read(path)
    meta_dict = payload.get(META_KEY)
    if meta_dict is not None and not (isinstance(meta_dict, dict) and isinstance(meta_dict.get("model_config"), dict)):
        raise LeFusionError(f"{path} has malformed LeFusion metadata (no model config).")
    model_state, num_steps = _network_state(payload["model"], path, "model")
    ema_state = _network_state(payload["ema"], path, "ema")[0] if payload.get("ema") is not None else None
    if config is None:
        config = ModelConfig.from_dict(meta_dict["model_config"]) if meta_dict else infer_config(model_state, path)
    if channels is not None and config.channels != channels:
        raise LeFusionError(f"{path} holds a network for {config.channels} image channel(s), "
                            f"but {channels} were requested.")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in config.build().state_dict().items()}
    for state in (model_state, ema_state):
        if state is not None:
            _check_against(state, expected, config, path)
    return Checkpoint(
        config=config,
        model_state=model_state,
        ema_state=ema_state,
        step=int(payload.get("step", 0)),
        num_steps=num_steps,
        meta=CheckpointMeta.from_dict(meta_dict) if meta_dict else None,
        optimizer_state=payload.get(OPTIMIZER_KEY),
        scaler_state=payload.get("scaler") or {},
    )


def read_meta(path: str | os.PathLike) -> CheckpointMeta | None:
    """Only the metadata of a checkpoint (None for an official one)."""
    meta = _read(Path(path)).get(META_KEY)
    return CheckpointMeta.from_dict(meta) if isinstance(meta, dict) else None


def export_checkpoint(source: str | os.PathLike, target: str | os.PathLike, weights: str = "ema",
                      dtype: torch.dtype = torch.float16, extras: dict | None = None) -> Checkpoint:
    """Write the ``weights`` (default EMA) of ``source`` alone, stored in ``dtype``, with its metadata (``extras``
    added) and step but without optimizer state: the file to ship or share (in float16 an eighth of a training
    checkpoint, which holds weights, EMA and two Adam moments in float32). Returns the checkpoint as read back from
    ``target``."""
    checkpoint = load_checkpoint(source)
    meta = checkpoint.meta
    if meta is not None:
        meta = replace(meta, extras={**meta.extras, **(extras or {}), "exported_weights": weights})
    save_checkpoint(target, checkpoint.build(weights), step=checkpoint.step, num_steps=checkpoint.num_steps,
                    meta=meta, dtype=dtype)
    return load_checkpoint(target)


def infer_config(state: dict[str, torch.Tensor], source: str | os.PathLike = "the state dict") -> ModelConfig:
    """Model config of an (official) network state dict, read from its weight shapes.

    ``resnet_groups`` leaves no trace in the shapes; the official value 8 is assumed.
    """
    required = ("init_conv.weight", "final_conv.1.weight", "time_rel_pos_bias.relative_attention_bias.weight",
                "mid_spatial_attn.fn.fn.fn.to_out.weight")
    if not all(key in state for key in required):
        raise LeFusionError(f"{source} does not hold a LeFusion Unet3D (it lacks {', '.join(required)}).")
    dim, channels, _, _, kernel = state["init_conv.weight"].shape
    levels = 0
    while f"downs.{levels}.0.block1.proj.weight" in state:
        levels += 1
    widths = [state[f"downs.{i}.0.block1.proj.weight"].shape[0] for i in range(levels)]
    heads = state["time_rel_pos_bias.relative_attention_bias.weight"].shape[1]
    inner = state["mid_spatial_attn.fn.fn.fn.to_out.weight"].shape[1]
    cond = state.get("null_cond_emb")
    if levels == 0 or any(w % dim for w in widths) or inner % heads:
        raise LeFusionError(f"{source} has inconsistent Unet3D weight shapes; it cannot be a LeFusion network.")
    return ModelConfig(
        dim=dim,
        dim_mults=tuple(w // dim for w in widths),
        channels=channels,
        out_channels=state["final_conv.1.weight"].shape[0],
        cond_dim=None if cond is None else cond.shape[1],
        attn_heads=heads,
        attn_dim_head=inner // heads,
        linear_attn=tuple(any(k.startswith(f"downs.{i}.2.") for k in state) for i in range(levels)),
        temporal_attn=tuple(any(k.startswith(f"downs.{i}.3.") for k in state) for i in range(levels)),
        init_kernel_size=kernel,
    )


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LeFusionError(f"Checkpoint file {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, OSError) as exc:
        raise LeFusionError(f"{path} is not a readable PyTorch checkpoint "
                            f"({type(exc).__name__}); the file may be corrupt or of another kind.") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise LeFusionError(f"{path} is not a LeFusion checkpoint: expected a dict with 'model' and 'ema' "
                            f"state dicts.")
    return payload


def _network_state(wrapper_state: Any, path: Path, part: str) -> tuple[dict[str, torch.Tensor], int]:
    """Network keys with ``denoise_fn.`` and ``module.`` removed, and the schedule length (300 if absent)."""
    if not isinstance(wrapper_state, dict):
        raise LeFusionError(f"{path}: '{part}' is not a state dict.")
    network: dict[str, torch.Tensor] = {}
    for key, value in wrapper_state.items():
        if key in BUFFER_NAMES:
            continue
        key = key.removeprefix(NETWORK_PREFIX).removeprefix(PARALLEL_PREFIX)
        if not isinstance(value, torch.Tensor):
            raise LeFusionError(f"{path}: '{part}' entry {key!r} is not a tensor.")
        network[key] = value.float() if value.is_floating_point() else value  # exports may hold float16
    betas = wrapper_state.get("betas")
    return network, 300 if betas is None else int(betas.shape[0])


def _check_against(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], config: ModelConfig,
                   path: Path) -> None:
    """Raise one readable error when ``state`` does not have the keys and shapes ``expected`` of ``config``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong)) if items]
    if problems:
        raise LeFusionError(f"{path} does not fit the network of its model config "
                            f"(dim {config.dim}, mults {list(config.dim_mults)}, {config.channels} channels): "
                            f"{'; '.join(problems)}.")


def _check_plain(value: Any, where: str) -> None:
    """Checkpoint metadata must load with ``torch.load(weights_only=True)``: plain types and tensors only."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise LeFusionError(f"Checkpoint metadata {where} has a key of type {type(key).__name__}; "
                                    f"use strings.")
            _check_plain(item, f"{where}.{key}")
        return
    raise LeFusionError(f"Checkpoint metadata {where} is a {type(value).__name__}; only plain Python types "
                        f"(dict, list, str, int, float, bool, None) and tensors can be stored.")
