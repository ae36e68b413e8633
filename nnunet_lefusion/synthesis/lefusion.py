"""LeFusion re-texturing: new lesion textures inside lesion masks, every other voxel kept bit-identical.

One case: ROI around the host organ -> [-1, 1] -> RePaint sampler (official jump schedule or the fast strided
mode) under a histogram condition -> lesion voxels mapped back to native intensities and dtype and pasted into
the native grid. :class:`LeFusionSynthesizer` does this for nnU-Net training cases: on their real lesion masks
(the paper's P') or, given a mask generator, on new lesions drawn onto lesion-free cases (N').
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from nnunet_lefusion import roi
from nnunet_lefusion.diffusion.histograms import HistogramClusters, choose_condition, lesion_histograms
from nnunet_lefusion.diffusion.sampler import RePaintSampler, SamplerConfig
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.placement import MaskGenerator, place_lesions
from nnunet_lefusion.model import checkpoint as ckpt_io
from nnunet_lefusion.model.config import ModelConfig
from nnunet_lefusion.model.unet3d import Unet3D
from nnunet_lefusion.synthesis.base import RawCase, Synthetic, SynthesisSkipped, lesion_voxel_counts
from nnunet_lefusion.training.roi_data import LesionRoi, lesion_roi
from nnunet_lefusion.training.sampler import SAMPLER_KIND

MODES = ("fast", "official")
WEIGHTS = ("ema", "model")
# "random": a training-histogram cluster drawn by its size (perturbed +-10 %); an int: that cluster (perturbed);
# "case": the lesion's own histograms in the ROI (same texture statistics, new pattern); an array: used as is.
Histogram = Union[str, int, Sequence[float], np.ndarray]


def sampler_config(mode: str = "fast", jumps: tuple[int, int] | None = None,
                   strided_steps: int | None = None) -> SamplerConfig:
    """The reverse walk of a mode: ``fast`` (strided DDIM with jumps, ~140 evaluations) or ``official``
    (all 300 steps, jump length / resamplings ``jumps``, default 5/5 = 1,480 evaluations)."""
    if mode not in MODES:
        raise LeFusionError(f"sampling mode must be one of {', '.join(MODES)}, got {mode!r}.")
    overrides = {} if jumps is None else {"jump_length": int(jumps[0]), "jump_n_sample": int(jumps[1])}
    if mode == "official":
        if strided_steps is not None:
            raise LeFusionError("strided steps only apply to the fast mode; the official mode walks every step.")
        return SamplerConfig.official(**overrides).validate()
    if strided_steps is not None:
        overrides["strided_steps"] = int(strided_steps)
    return SamplerConfig.fast(**overrides).validate()


@dataclass
class LesionSampler:
    """A trained LeFusion denoiser with what sampling needs from its checkpoint metadata."""

    model: Unet3D
    labels: LesionLabels
    roi_size: tuple[int, int, int]
    clusters: HistogramClusters
    schedule: CosineSchedule
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu", weights: str = "ema") -> "LesionSampler":
        """Read a sampler checkpoint (``nnUNetv2_lefusion_train_sampler``); ``weights`` picks EMA or online."""
        if weights not in WEIGHTS:
            raise LeFusionError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}.")
        loaded = ckpt_io.load_checkpoint(checkpoint, map_location="cpu")
        meta = loaded.meta or {}
        if meta.get("kind") != SAMPLER_KIND:
            raise LeFusionError(f"{checkpoint} is not a LeFusion sampler checkpoint (no sampler metadata; "
                                f"kind {meta.get('kind')!r}).")
        state = loaded.ema_state if weights == "ema" and loaded.ema_state is not None else loaded.model_state
        model = ModelConfig.from_dict(meta["model_config"]).build()
        model.load_state_dict(state)
        model.to(_device(device)).eval()
        return cls(model, LesionLabels.from_dict(meta["lesion_labels"]), tuple(meta["roi_size"]),
                   HistogramClusters.from_dict(meta["histogram_clusters"]), CosineSchedule(meta["num_timesteps"]),
                   str(checkpoint))

    def condition(self, item: LesionRoi, lesion_labels: Sequence[int], histogram: Histogram,
                  rng: np.random.Generator) -> np.ndarray:
        """The histogram condition (cond_dim values) for one ROI."""
        if isinstance(histogram, str):
            if histogram == "case":
                return lesion_histograms(item.image, item.label, lesion_labels)
            if histogram != "random":
                raise LeFusionError(f"histogram must be 'random', 'case', a cluster index or values, got {histogram!r}.")
            return choose_condition(self.clusters, rng)
        if isinstance(histogram, (int, np.integer)):
            return choose_condition(self.clusters, rng, cluster=int(histogram))
        return choose_condition(self.clusters, rng, histogram=histogram)

    def resynthesize_many(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                          lesion_labels: Sequence[int], rng: np.random.Generator, config: SamplerConfig,
                          histogram: Histogram = "random", batch_size: int = 4) -> list[np.ndarray]:
        """New lesion textures for several native-grid cases (Z, Y, X), ``batch_size`` ROIs per sampler call.

        Returns copies of ``images`` (same dtype) differing only on lesion voxels inside each ROI.
        """
        if len(lesion_labels) != self.model.config.channels:
            raise LeFusionError(f"the sampler has {self.model.config.channels} lesion channel(s) but "
                                f"{len(lesion_labels)} lesion label(s) {list(lesion_labels)} were given.")
        if batch_size < 1:
            raise LeFusionError(f"the sampling batch size must be >= 1, got {batch_size}.")
        items, conds = [], []
        host = LesionLabels(tuple(lesion_labels), self.labels.organ if not _shared(self.labels, lesion_labels)
                            else self.labels.organ, self.labels.cavity)
        for image, label in zip(images, labels):
            image, label = np.asarray(image), np.asarray(label)
            if image.shape != label.shape or image.ndim != 3:
                raise LeFusionError(f"image {image.shape} and label {label.shape} must be 3D (Z, Y, X) of one shape.")
            if not np.isin(label, lesion_labels).any():
                raise LeFusionError(f"the label map has no voxel of the lesion labels {list(lesion_labels)}.")
            item = lesion_roi(image, label, host, self.roi_size)
            items.append(item)
            conds.append(self.condition(item, lesion_labels, histogram, rng))
        sampler = RePaintSampler(self.model, self.schedule, config)
        generator = torch.Generator(self.device).manual_seed(int(rng.integers(2 ** 63)))
        out = []
        for first in range(0, len(items), batch_size):
            chunk = items[first:first + batch_size]
            device = self.device
            result = sampler.sample(torch.from_numpy(np.stack([i.image for i in chunk])).to(device),
                                    torch.from_numpy(np.stack([i.label.astype(np.int64) for i in chunk])).to(device),
                                    lesion_labels, torch.from_numpy(np.stack(conds[first:first + batch_size])),
                                    generator)
            for item, roi_unit, image in zip(chunk, result.image.cpu().numpy(), images[first:first + batch_size]):
                where = np.isin(item.label, lesion_labels)
                out.append(roi.paste_image(image, roi_unit, where, item.spec))
        return out


def _shared(labels: LesionLabels, lesion_labels: Sequence[int]) -> bool:
    return tuple(lesion_labels) == labels.lesions


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LeFusionError(f"device '{name}' was requested but CUDA is not available here; use cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LeFusionError(f"unknown device '{name}'; use cpu or cuda.") from None
