"""Training the LeFusion texture denoiser on lesion ROIs: metadata, the lesion-focused loss, the run itself."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from nnunet_lefusion.diffusion.histograms import NUM_BINS, HistogramClusters, cluster_histograms
from nnunet_lefusion.diffusion.lesion_maps import (MAPS_PER_CLASS, histogram_levels, is_lesion_aware, lesion_maps,
                                                   with_maps)
from nnunet_lefusion.diffusion.level_offset import offset_map
from nnunet_lefusion.diffusion.loss import NORMALISATIONS, lesion_channel_masks, training_loss
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.model.checkpoint import Checkpoint, CheckpointMeta, load_checkpoint
from nnunet_lefusion.model.config import ModelConfig
from nnunet_lefusion.training.loop import TrainConfig, TrainResult, train
from nnunet_lefusion.training.roi_data import FLIP_AXIS, INTENSITY_PERCENTILES, RoiSet

SAMPLER_KIND = "lefusion_sampler"
NUM_TIMESTEPS = 300
DEFAULT_CLUSTERS = 3


def check_model_fits(config: ModelConfig, num_classes: int, roi_size: Sequence[int]) -> None:
    """``LeFusionError`` unless the network has one output channel (and one input channel, or three with the
    lesion maps) and 16 histogram values per lesion class and the ROI's height and width suit its downsampling."""
    if config.out_channels != num_classes or config.channels not in (num_classes, (1 + MAPS_PER_CLASS) * num_classes):
        raise LeFusionError(f"the model config has {config.channels} input / {config.out_channels} output channels "
                            f"but the dataset has {num_classes} lesion class(es); set channels to {num_classes} "
                            f"(or {(1 + MAPS_PER_CLASS) * num_classes} with the lesion maps) and out_channels to "
                            f"{num_classes}.")
    if config.cond_dim != NUM_BINS * num_classes:
        raise LeFusionError(f"the model config has cond_dim {config.cond_dim} but {num_classes} lesion class(es) "
                            f"need {NUM_BINS * num_classes} ({NUM_BINS} histogram bins per class).")
    factor = 2 ** (len(config.dim_mults) - 1)
    if roi_size[1] % factor or roi_size[2] % factor:
        raise LeFusionError(f"the ROI's Y and X sizes {tuple(roi_size[1:])} must be divisible by {factor} "
                            f"for this model config ({len(config.dim_mults)} levels).")


def sampler_meta(labels: LesionLabels, roi_size: Sequence[int], rois: RoiSet,
                 num_clusters: int = DEFAULT_CLUSTERS, seed: int = 0, histogram_scale: float = 1.0,
                 mean_weight: float = 0.0, level_offset: bool = False,
                 normalisation: str = "volume") -> CheckpointMeta:
    """The ``lefusion_meta`` of a sampler checkpoint: everything sampling needs besides the weights.

    ``histogram_clusters`` holds k-means centres of the training histograms (the texture presets offered at
    sampling, official-style: one cond_dim vector each); their sizes, the label roles and ``histogram_scale``
    (the factor the network sees the histograms multiplied by; 1 = official) are in ``extras``, and the weight of
    the lesion-mean loss term where it was used, whether the network generates lesions around 0 and takes their
    level from the condition (``diffusion.level_offset``), the loss normalisation where it is not the official
    ``volume`` (``diffusion.loss.lesion_l1_loss``), and each cluster's organ level (``cluster_histograms``).
    """
    clusters = cluster_histograms(rois.histograms, num_clusters, seed=seed, organ_levels=rois.organ_levels)
    stored = clusters.to_dict()
    return CheckpointMeta(
        lesion_labels=list(labels.lesions),
        roi_size=[int(s) for s in roi_size],
        intensity={"mapping": "per-volume percentile range to [-1, 1], clipped",
                   "percentiles": list(INTENSITY_PERCENTILES), "roi_padding": -1.0},
        histogram_clusters=stored["centers"],
        extras={"kind": SAMPLER_KIND, "labels": labels.to_dict(), "cluster_counts": stored["counts"],
                "cluster_organ_levels": stored["organ_levels"],
                "histogram_bins": clusters.num_bins, "histogram_scale": float(histogram_scale),
                "training_cases": len(rois),
                "augmentation": {"flip_axis": "Y", "probability": 0.5, "array_axis": FLIP_AXIS},
                **({"mean_loss_weight": float(mean_weight)} if mean_weight else {}),
                **({"level_offset": True} if level_offset else {}),
                **({"loss_normalisation": normalisation} if normalisation != "volume" else {})})


def sampler_clusters(meta: CheckpointMeta) -> HistogramClusters:
    """The histogram clusters stored by :func:`sampler_meta`."""
    return HistogramClusters.from_dict({"centers": meta.histogram_clusters, "counts": meta.extras["cluster_counts"],
                                        "num_bins": meta.extras["histogram_bins"],
                                        "organ_levels": meta.extras.get("cluster_organ_levels")})


def stored_histogram_scale(meta: CheckpointMeta | None) -> float:
    """The factor a sampler's network sees its histogram condition multiplied by (1 for official checkpoints)."""
    return float(meta.extras.get("histogram_scale", 1.0)) if meta is not None else 1.0


def stored_level_offset(meta: CheckpointMeta | None) -> bool:
    """Whether a sampler's lesions take their condition's level by construction (False for official ones)."""
    return bool(meta.extras.get("level_offset", False)) if meta is not None else False


class LesionLoss:
    """``loss_fn`` for the training loop: official lesion-focused eps L1, channel k on lesion class k.

    ``histogram_scale`` multiplies the condition (official: 1, raw histograms whose bins are small next to the
    time embedding); ``cond_drop`` replaces it by the network's learned null condition for that fraction of the
    batch (official: 0), which teaches the network the unconditional model as well (the reference of
    ``benchmarks/condition_response.py``); ``mean_weight`` adds the lesion-mean term of
    :func:`~nnunet_lefusion.diffusion.loss.lesion_mean_loss` (official: 0). A ``lesion_aware`` network also sees the
    lesion maps of its batch (``diffusion.lesion_maps``), without levels where the condition is dropped.
    ``level_offset``: the network learns each lesion class around 0, moved by minus its condition's level
    (``diffusion.level_offset``). ``normalisation``: ``volume`` (official) weighs each class by its voxel count,
    ``lesion`` weighs the classes alike, so a rare inner class (no-reflow) teaches the network as much as the
    outer one (``diffusion.loss.lesion_l1_loss``).
    """

    def __init__(self, lesion_labels: Sequence[int], num_timesteps: int = NUM_TIMESTEPS,
                 normalisation: str = "volume", histogram_scale: float = 1.0, cond_drop: float = 0.0,
                 mean_weight: float = 0.0, lesion_aware: bool = False, level_offset: bool = False) -> None:
        if not 0.0 <= cond_drop < 1.0 or histogram_scale <= 0 or mean_weight < 0:
            raise LeFusionError(f"need 0 <= cond_drop < 1, histogram_scale > 0 and mean_weight >= 0, got {cond_drop}, "
                                f"{histogram_scale} and {mean_weight}.")
        if normalisation not in NORMALISATIONS:
            raise LeFusionError(f"loss normalisation must be one of {NORMALISATIONS}, got {normalisation!r}.")
        self.lesion_labels = tuple(lesion_labels)
        self.schedule = CosineSchedule(num_timesteps)
        self.normalisation = normalisation
        self.histogram_scale = float(histogram_scale)
        self.cond_drop = float(cond_drop)
        self.mean_weight = float(mean_weight)
        self.lesion_aware = lesion_aware
        self.level_offset = level_offset

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0, cond = batch["x0"], batch["cond"] * self.histogram_scale
        self.schedule = self.schedule.to(x0.device)
        if self.cond_drop:
            dropped = torch.rand(cond.shape[0], device=cond.device) < self.cond_drop
            cond = torch.where(dropped[:, None], model.null_cond_emb.to(cond).expand_as(cond), cond)
        masks = lesion_channel_masks(batch["label"], self.lesion_labels)
        if self.level_offset:
            x0 = x0 - offset_map(masks, batch["cond"]).to(x0)
        denoiser = model
        if self.lesion_aware:
            levels = histogram_levels(batch["cond"], masks.shape[1])
            denoiser = with_maps(model, lesion_maps(masks, levels * ~dropped[:, None] if self.cond_drop else levels))
        return training_loss(denoiser, self.schedule, x0, masks, cond, normalisation=self.normalisation,
                             mean_weight=self.mean_weight)


def with_lesion_maps(config: ModelConfig) -> ModelConfig:
    """``config`` with the input channels of the lesion maps (``diffusion.lesion_maps``) added, if it lacks them."""
    return replace(config, channels=(1 + MAPS_PER_CLASS) * config.out_channels)


def widened_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights ``state`` of a network without the lesion maps, for the lesion-aware network of ``config``: the
    first convolution gets zero weights on the map channels, so the new network starts out as the old one."""
    weight = state["init_conv.weight"]
    extra = config.channels - weight.shape[1]
    if extra <= 0:
        return state
    zeros = weight.new_zeros((weight.shape[0], extra, *weight.shape[2:]))
    return {**state, "init_conv.weight": torch.cat((weight, zeros), dim=1)}


def initial_sampler(path: str | Path, labels: LesionLabels, config: ModelConfig | None = None,
                    scale: float | None = None) -> Checkpoint:
    """A sampler checkpoint to start a training from (fine-tuning), refused unless it is a LeFusion sampler for
    as many lesion classes as ``labels`` has, with the model ``config`` (but for the lesion-map inputs, which
    a fine-tuning may add) and histogram ``scale`` where given."""
    checkpoint = load_checkpoint(path)
    kind = checkpoint.meta.extras.get("kind") if checkpoint.meta is not None else None
    if kind != SAMPLER_KIND:
        raise LeFusionError(f"--init {path} is not a LeFusion sampler checkpoint (kind {kind!r}).")
    if len(checkpoint.meta.lesion_labels) != len(labels.lesions):
        raise LeFusionError(f"--init {path} has {len(checkpoint.meta.lesion_labels)} lesion class(es), the dataset "
                            f"{len(labels.lesions)}.")
    stored = stored_histogram_scale(checkpoint.meta)
    if (config is not None and with_lesion_maps(config) != with_lesion_maps(checkpoint.config)) \
            or scale not in (None, stored):
        raise LeFusionError(f"--init {path} holds a network of another --config or --histogram-scale ({stored}); "
                            "leave them out to take its own.")
    return checkpoint


def train_sampler(rois: RoiSet, config: ModelConfig, labels: LesionLabels, roi_size: Sequence[int],
                  out_dir: str | Path, train_config: TrainConfig, num_clusters: int = DEFAULT_CLUSTERS,
                  resume: bool = False, histogram_scale: float = 1.0, cond_drop: float = 0.0,
                  training_data: dict | None = None, mean_weight: float = 0.0,
                  init: str | Path | None = None, level_offset: bool = False,
                  normalisation: str = "volume") -> TrainResult:
    """Train a fresh (or resumed) LeFusion denoiser of ``config`` on ``rois``; files go to ``out_dir``.
    ``histogram_scale``, ``cond_drop``, ``mean_weight``, ``level_offset`` and ``normalisation``: see ``LesionLoss``
    (scale and level offset are stored for sampling, the normalisation for the record);
    ``training_data``: the cases ``rois`` come from, recorded in the checkpoint (``nnunet.provenance``);
    ``init``: a sampler checkpoint whose EMA weights the run starts from instead of random ones (fine-tuning; its
    config and histogram scale must be ``config`` and ``histogram_scale``, except that ``config`` may add the
    lesion maps: see ``widened_state``); its file, step and the cases it and the weights it started from saw are
    recorded."""
    check_model_fits(config, len(labels.lesions), roi_size)
    loss = LesionLoss(labels.lesions, normalisation=normalisation, histogram_scale=histogram_scale,
                      cond_drop=cond_drop, mean_weight=mean_weight,
                      lesion_aware=is_lesion_aware(config.channels, config.out_channels), level_offset=level_offset)
    meta = sampler_meta(labels, roi_size, rois, num_clusters, seed=train_config.seed, histogram_scale=histogram_scale,
                        mean_weight=mean_weight, level_offset=level_offset, normalisation=normalisation)
    meta.training_data = training_data
    torch.manual_seed(train_config.seed)
    model = config.build()
    if init is not None:
        start = initial_sampler(init, labels, config, histogram_scale)
        model.load_state_dict(widened_state(start.ema_state if start.ema_state is not None else start.model_state,
                                            config))
        earlier = start.meta.extras.get("initialised_from", {}).get("training_data", [])
        meta.extras["initialised_from"] = {"file": Path(init).name, "step": start.step,
                                           "training_data": [start.meta.training_data, *earlier]}
    batch_size = train_config.batch_size
    return train(model, loss, lambda rng: rois.make_batch(rng, batch_size), out_dir, meta, train_config,
                 resume=resume, num_timesteps=NUM_TIMESTEPS)

