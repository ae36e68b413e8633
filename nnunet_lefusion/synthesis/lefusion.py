"""LeFusion re-texturing: new lesion textures inside lesion masks, every other voxel kept bit-identical.

One case: ROI around the host organ -> [-1, 1] -> RePaint sampler (official jump schedule or the fast strided
mode) under a histogram condition -> optionally each lesion class histogram-matched to its condition (by default
only for a sampler without a level offset, whose lesions drift towards their surroundings' grey) -> lesion voxels
mapped back to native intensities and dtype and pasted into the native grid. :class:`LeFusionSynthesizer` does
this for nnU-Net training cases: on their real lesion masks (the paper's P') or, given a mask generator, on
generated lesions added to a case (on normal cases: N').
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from nnunet_lefusion import roi
from nnunet_lefusion.diffusion.histograms import (NUM_BINS, HistogramClusters, choose_condition, lesion_histograms,
                                                   organ_level, read_official_clusters)
from nnunet_lefusion.diffusion.lesion_maps import is_lesion_aware
from nnunet_lefusion.diffusion.sampler import RePaintSampler, SamplerConfig, fast_precision
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.placement import MaskGenerator, place_lesions
from nnunet_lefusion.model.checkpoint import load_checkpoint
from nnunet_lefusion.model.unet3d import Unet3D
from nnunet_lefusion.synthesis.base import Proposal, RawCase, Synthetic, SynthesisSkipped, lesion_voxel_counts
from nnunet_lefusion.synthesis.plan import KINDS
from nnunet_lefusion.training.loop import resolve_device
from nnunet_lefusion.training.roi_data import INTENSITY_PERCENTILES, LesionRoi
from nnunet_lefusion.training.sampler import (SAMPLER_KIND, sampler_clusters, stored_histogram_scale,
                                              stored_level_offset)

MODES = ("fast", "official")
# "random": a training-histogram cluster drawn by its size (perturbed +-10 %); an int: that cluster (perturbed);
# "case": the lesion's own histograms in the ROI (same texture statistics, new pattern); an array: used as is.
Histogram = Union[str, int, Sequence[float], np.ndarray]


def sampler_config(mode: str = "fast", jumps: tuple[int, int] | None = None,
                   strided_steps: int | None = None, guidance: float | None = None,
                   precision: str | None = None) -> SamplerConfig:
    """The reverse walk of a mode: ``fast`` (strided DDIM with jumps, 128 evaluations) or ``official``
    (all 300 steps, jump length / resamplings ``jumps``, default 5/5 = 1,480 evaluations); ``guidance`` and
    ``precision``: see ``SamplerConfig`` (None: the sampler checkpoint's guidance, the device's fast precision)."""
    if mode not in MODES:
        raise LeFusionError(f"sampling mode must be one of {', '.join(MODES)}, got {mode!r}.")
    overrides = {"guidance": None if guidance is None else float(guidance), "precision": precision}
    if jumps is not None:
        overrides.update(jump_length=int(jumps[0]), jump_n_sample=int(jumps[1]))
    if mode == "official":
        if strided_steps is not None:
            raise LeFusionError("strided steps only apply to the fast mode; the official mode walks every step.")
        return SamplerConfig.official(**overrides).validate()
    if strided_steps is not None:
        overrides["strided_steps"] = int(strided_steps)
    return SamplerConfig.fast(**overrides).validate()


@dataclass
class LesionSampler:
    """A trained LeFusion denoiser with what sampling needs from its checkpoint metadata.

    ``in_plane_transposed``: the network sees ROIs as (Z, X, Y) instead of our (Z, Y, X). True for official
    LeFusion checkpoints (torchio reads NIfTI as (X, Y, Z) and the official code permutes it to (Z, X, Y)).
    """

    model: Unet3D
    labels: LesionLabels
    roi_size: tuple[int, int, int]
    clusters: HistogramClusters | None
    schedule: CosineSchedule
    source: str = ""
    in_plane_transposed: bool = False
    histogram_scale: float = 1.0
    guidance: float = 1.0  # classifier-free guidance used when a SamplerConfig leaves it open
    level_offset: bool = False  # the lesions take their condition's level by construction (diffusion.level_offset)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def matches_histograms(self, histogram_matching: bool | None) -> bool:
        """Whether lesions are histogram-matched to their condition: as asked, else (``None``) only where the network
        does not take the condition's level by construction (no ``level_offset``)."""
        return not self.level_offset if histogram_matching is None else histogram_matching

    @property
    def lesion_aware(self) -> bool:
        """Whether the network also sees the lesion masks and levels (``diffusion.lesion_maps``)."""
        return is_lesion_aware(self.model.config.channels, self.model.config.out_channels)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu", weights: str = "ema",
             clusters: str | Path | None = None) -> "LesionSampler":
        """Read a sampler checkpoint; ``weights`` picks the EMA (default) or the online weights; ``clusters``: an
        official histogram-cluster file (``read_official_clusters``) used instead of the checkpoint's clusters.

        Our checkpoints (``nnUNetv2_lefusion_train_sampler``) carry labels, ROI size and histogram clusters. An
        official cardiac checkpoint (2 channels) gets the Emidec setting: labels 3/4 in myocardium 2, ROI
        10x72x72, in-plane axes transposed, and no clusters unless ``clusters`` gives the official ones (else give a
        histogram or use the lesion's own).
        """
        loaded = load_checkpoint(checkpoint)
        meta = loaded.meta
        if meta is not None and meta.extras.get("kind") != SAMPLER_KIND:
            raise LeFusionError(f"{checkpoint} is not a LeFusion sampler checkpoint "
                                f"(kind {meta.extras.get('kind')!r}).")
        if meta is None and (loaded.config.channels != 2 or loaded.config.cond_dim != 2 * NUM_BINS):
            raise LeFusionError(f"{checkpoint} is an official checkpoint but not the cardiac (Emidec) sampler; "
                                f"only that one can be used without our metadata.")
        labels = LesionLabels.emidec() if meta is None else LesionLabels.from_dict(meta.extras["labels"])
        given = None if clusters is None else read_official_clusters(clusters, len(labels.lesions))
        if given is not None and given.cond_dim != loaded.config.cond_dim:
            raise LeFusionError(f"the histogram clusters {clusters} hold conditions of {given.cond_dim} values, but "
                                f"the sampler {checkpoint} takes {loaded.config.cond_dim}.")
        model = loaded.build(weights).to(resolve_device(device))
        schedule = CosineSchedule(loaded.num_steps)
        if meta is None:
            return cls(model, labels, roi.OFFICIAL_CARDIAC_SIZE, given, schedule, str(checkpoint), True)
        return cls(model, labels, tuple(meta.roi_size), given or sampler_clusters(meta), schedule, str(checkpoint),
                   histogram_scale=stored_histogram_scale(meta), guidance=float(meta.extras.get("guidance", 1.0)),
                   level_offset=stored_level_offset(meta))

    def condition(self, item: LesionRoi, labels: LesionLabels, histogram: Histogram,
                  rng: np.random.Generator) -> np.ndarray:
        """The histogram condition (cond_dim values) for one ROI; a cluster's is moved to the ROI's organ level
        (``choose_condition``)."""
        cluster = None
        if isinstance(histogram, str):
            if histogram == "case":
                return lesion_histograms(item.image, item.label, labels.lesions)
            if histogram != "random":
                raise LeFusionError(f"histogram must be 'random', 'case', a cluster index or values, "
                                    f"got {histogram!r}.")
        elif isinstance(histogram, (int, np.integer)):
            cluster = int(histogram)
        else:  # explicit values: only their length is taken from the clusters
            clusters = self.clusters or HistogramClusters([[0.0] * self.model.config.cond_dim], [1])
            return choose_condition(clusters, rng, histogram=histogram)
        if self.clusters is None:
            raise LeFusionError("this checkpoint holds no histogram clusters; give the official ones (--clusters "
                                "FILE), a histogram or use the lesion's own (--histogram FILE / --own-histogram).")
        return choose_condition(self.clusters, rng, cluster=cluster,
                                present=[bool((item.label == v).any()) for v in labels.lesions],
                                organ_level=organ_level(item.image, item.label, labels.organ))

    def network_axes(self, roi_array: np.ndarray) -> np.ndarray:
        """ROI (Z, Y, X) in the network's axis order (and back: the transposition is its own inverse)."""
        return np.ascontiguousarray(np.swapaxes(roi_array, -1, -2)) if self.in_plane_transposed else roi_array

    def resynthesize_pairs(self, images: Sequence[np.ndarray], label_maps: Sequence[np.ndarray],
                           rng: np.random.Generator, config: SamplerConfig, histogram: Histogram = "random",
                           labels: LesionLabels | None = None,
                           batch_size: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
        """New lesion textures for several native-grid cases (Z, Y, X), ``batch_size`` ROIs per sampler call.

        ``labels`` are the roles of the cases' labels (default: those the sampler was trained with); network
        channel k re-textures ``labels.lesions[k]``. Every lesion voxel is re-textured: the window is placed to
        hold a case's lesions, or, for lesions wider than one window, several windows are sampled one after the
        other, each keeping what the earlier ones made as known background. Returns, per case, two copies of the
        image (same dtype) that differ from it only on lesion voxels: the network's textures as sampled, and the
        same textures with each lesion class histogram-matched to its condition (see ``RePaintSampler``).
        """
        labels = labels or self.labels
        if len(labels.lesions) != self.model.config.out_channels:
            raise LeFusionError(f"the sampler has {self.model.config.out_channels} lesion channel(s) but the data has "
                                f"{len(labels.lesions)} lesion label(s) {list(labels.lesions)}.")
        if batch_size < 1:
            raise LeFusionError(f"the sampling batch size must be >= 1, got {batch_size}.")
        windows, conds = [], []
        for image, label in zip(images, label_maps, strict=True):
            image, label = np.asarray(image), np.asarray(label)
            if image.shape != label.shape or image.ndim != 3:
                raise LeFusionError(f"image {image.shape} and label {label.shape} must be 3D (Z, Y, X) of one shape.")
            if not np.isin(label, labels.lesions).any():
                raise LeFusionError(f"the label map has no voxel of the lesion labels {list(labels.lesions)}.")
            specs = roi.covering_rois(image, label, labels.host, labels.lesions, self.roi_size, INTENSITY_PERCENTILES)
            windows.append(specs)
            whole = LesionRoi(specs[0].intensity.to_unit(image), label, specs[0])
            conds.append(self.condition(whole, labels, histogram, rng))
        config = replace(config, guidance=self.guidance if config.guidance is None else config.guidance,
                         precision=config.precision or fast_precision(self.device))
        sampler = RePaintSampler(self.model, self.schedule, config, self.lesion_aware)
        generator = torch.Generator(self.device).manual_seed(int(rng.integers(2 ** 63)))
        sampled = [np.array(image, copy=True) for image in images]
        matched = [np.array(image, copy=True) for image in images]
        done = [np.zeros(np.shape(label), dtype=bool) for label in label_maps]
        for step in range(max(map(len, windows))):
            todo = [i for i, specs in enumerate(windows) if step < len(specs)]
            for first in range(0, len(todo), batch_size):
                chunk = todo[first:first + batch_size]
                specs = [windows[i][step] for i in chunk]
                roi_labels = [np.where(roi.crop(done[i], spec), 0, roi.crop(label_maps[i], spec)).astype(np.int64)
                              for i, spec in zip(chunk, specs)]
                result = sampler.sample(
                    torch.from_numpy(self.network_axes(np.stack([roi.crop_image(sampled[i], spec)
                                                                 for i, spec in zip(chunk, specs)]))).to(self.device),
                    torch.from_numpy(self.network_axes(np.stack(roi_labels))).to(self.device), labels.lesions,
                    torch.from_numpy(np.stack([conds[i] for i in chunk])) * self.histogram_scale, generator,
                    histogram_matching=True, level_offset=self.level_offset)
                raw, fitted = (self.network_axes(r.cpu().numpy()) for r in (result.image, result.matched))
                for i, spec, roi_label, roi_raw, roi_fitted in zip(chunk, specs, roi_labels, raw, fitted):
                    new = np.isin(roi_label, labels.lesions)
                    sampled[i] = roi.paste_image(sampled[i], roi_raw, new, spec)
                    matched[i] = roi.paste_image(matched[i], roi_fitted, new, spec)
                    native, inside = spec.overlap()
                    done[i][native] |= new[inside]
        return list(zip(sampled, matched))

    def resynthesize_many(self, images: Sequence[np.ndarray], label_maps: Sequence[np.ndarray],
                          rng: np.random.Generator, config: SamplerConfig, histogram: Histogram = "random",
                          labels: LesionLabels | None = None, batch_size: int = 4,
                          histogram_matching: bool | None = None) -> list[np.ndarray]:
        """``resynthesize_pairs``, keeping the histogram-matched copies or the network's textures as sampled
        (``histogram_matching``, default: see :meth:`matches_histograms`)."""
        pairs = self.resynthesize_pairs(images, label_maps, rng, config, histogram, labels, batch_size)
        return [pair[1 if self.matches_histograms(histogram_matching) else 0] for pair in pairs]


def resynthesize(image: np.ndarray, label: np.ndarray, sampler: LesionSampler | str | Path, mode: str = "fast",
                 histogram: Histogram = "random", seed: int = 0, device: str = "cpu",
                 labels: LesionLabels | None = None, jumps: tuple[int, int] | None = None,
                 strided_steps: int | None = None, histogram_matching: bool | None = None) -> np.ndarray:
    """``image`` (Z, Y, X) with the lesions of ``label`` re-textured; every other voxel is bit-identical.

    ``sampler`` is a loaded :class:`LesionSampler` or a checkpoint path. The result keeps the dtype and lies
    within the image's own intensity range; ``histogram_matching`` makes each lesion class take the intensity
    distribution of its histogram condition exactly (see ``LesionSampler.resynthesize_pairs``; default: only for
    a sampler without a level offset, ``LesionSampler.matches_histograms``).
    """
    if not isinstance(sampler, LesionSampler):
        sampler = LesionSampler.load(sampler, device)
    config = sampler_config(mode, jumps, strided_steps)
    return sampler.resynthesize_many([image], [label], np.random.default_rng(seed), config, histogram, labels,
                                     histogram_matching=histogram_matching)[0]


class LeFusionSynthesizer:
    """The Synthesizer of the LeFusion method (``propose`` the label map, then ``render`` its lesion textures).

    Kinds: ``retexture`` re-textures the target's real lesions (P'). With a ``mask_generator`` also ``newmask``
    and ``normal``: generated lesions are drawn onto the target's organ with ``place_lesions``, keeping the lesions
    it already has (so no voxel keeps a lesion texture under an organ label), and every lesion voxel is then
    textured; on a normal case that is the paper's N'. Only channel ``channel`` of a multi-channel image is
    re-textured; ``histogram_matching``: see :func:`resynthesize`; ``clusters``: see :meth:`LesionSampler.load`.
    """

    name = "lefusion"

    def __init__(self, checkpoint: str | Path | LesionSampler, labels: LesionLabels, mode: str = "fast",
                 device: str = "cpu", histogram: Histogram = "random", mask_generator: MaskGenerator | None = None,
                 weights: str = "ema", jumps: tuple[int, int] | None = None, strided_steps: int | None = None,
                 channel: int = 0, batch_size: int = 4, histogram_matching: bool | None = None,
                 clusters: str | Path | None = None) -> None:
        self.sampler = checkpoint if isinstance(checkpoint, LesionSampler) else LesionSampler.load(
            checkpoint, device, weights, clusters)
        self.labels = labels
        self.mode = mode
        self.config = sampler_config(mode, jumps, strided_steps)
        self.histogram = histogram
        self.mask_generator = mask_generator
        self.kinds = ("retexture",) if mask_generator is None else KINDS
        self.channel = channel
        self.batch_size = batch_size
        self.histogram_matching = self.sampler.matches_histograms(histogram_matching)

    def propose(self, target: RawCase, kind: str, rng: np.random.Generator,
                want_classes: Sequence[int] | None = None) -> Proposal:
        """The label map of the new case: the target's own (``retexture``) or with generated lesions added (holding
        ``want_classes``, see ``MaskGenerator.generate``)."""
        return self.propose_many(target, kind, rng, 1, want_classes)[0]

    def propose_many(self, target: RawCase, kind: str, rng: np.random.Generator, count: int,
                     want_classes: Sequence[int] | None = None) -> list[Proposal]:
        """``count`` proposals on ``target``, their new lesions drawn in one batched mask-generator call; candidates
        whose lesions cannot be placed are left out (``SynthesisSkipped`` if none is left)."""
        if kind not in self.kinds:
            raise LeFusionError(f"the LeFusion synthesizer makes {', '.join(self.kinds)} cases, not {kind!r}"
                                + ("" if self.mask_generator else " (new lesions need a mask generator)"))
        seg = target.seg[0]
        has_lesions = bool(np.isin(seg, self.labels.lesions).any())
        if kind == "retexture":
            if not has_lesions:
                raise SynthesisSkipped(f"{target.identifier} has no lesion to re-texture")
            return [Proposal(target, target.seg, {"method": self.name, "kind": kind}) for _ in range(count)]
        if not np.isin(seg, self.labels.organ).any():
            raise SynthesisSkipped(f"{target.identifier} has no organ (labels {list(self.labels.organ)})")
        old = np.where(np.isin(seg, self.labels.lesions), seg, 0)
        try:
            drawn = self.mask_generator.generate_many([seg] * count, rng, want_classes, [target.spacing] * count)
        except LeFusionError as exc:
            raise SynthesisSkipped(f"no lesion could be drawn on {target.identifier}: {exc}") from None
        proposals, why = [], "the mask generator drew no lesion"
        for lesions in drawn:
            if not (lesions > 0).any():
                continue
            try:
                placed = place_lesions(seg, np.where(lesions > 0, lesions, old), self.labels)
            except LeFusionError as exc:
                why = str(exc)
                continue
            proposals.append(Proposal(target, placed.astype(seg.dtype, copy=False)[None],
                                      {"method": self.name, "kind": kind}))
        if not proposals:
            raise SynthesisSkipped(f"no lesion could be placed on {target.identifier}: {why}")
        return proposals

    def render(self, proposal: Proposal, rng: np.random.Generator) -> Synthetic:
        return self.render_many([proposal], rng)[0]

    def render_many(self, proposals: Sequence[Proposal], rng: np.random.Generator) -> list[Synthetic]:
        """Render several proposals, ``batch_size`` ROIs per sampler call."""
        images = self.sampler.resynthesize_many([p.target.image[self.channel] for p in proposals],
                                                [p.seg[0] for p in proposals], rng, self.config, self.histogram,
                                                self.labels, self.batch_size, self.histogram_matching)
        out = []
        for proposal, channel_image in zip(proposals, images):
            image = proposal.target.image.copy()
            image[self.channel] = channel_image
            out.append(Synthetic(proposal.target.with_arrays(image, proposal.seg), {
                **proposal.provenance, "mode": self.mode, "histogram_matching": self.histogram_matching,
                "evaluations": self.config.evaluations(self.sampler.schedule.num_steps),
                "checkpoint": self.sampler.source, "lesion_voxels": lesion_voxel_counts(proposal.seg, self.labels)}))
        return out
