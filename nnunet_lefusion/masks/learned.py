"""The learned lesion-mask generator: a small conditional diffusion model over multi-class lesion masks (DiffMask-like).

The network is the LeFusion ``Unet3D``. Its input is the noisy masks (one channel per lesion class, outer to
inner, in [-1, 1]) concatenated with the condition maps of ``mask_data.CONDITION_CHANNELS`` (host organ, cavity,
control cylinder); its ``cond`` vector is the standardised size control (volume fraction per class and
transmurality). It predicts the noise of the mask channels, on the cosine schedule, with an L1 loss over the
network-grid cells that hold host organ (elsewhere masks are known to be -1).

Sampling (``LearnedMaskGenerator``): a control measured on a training lesion is drawn (with the classes asked
for), turned by a random angle about the LV centre and laid on the target organ; the diffusion package's
``RePaintSampler`` then walks a strided DDIM schedule in which the cells outside the organ are known (-1). The
result is pasted back into the native grid (zoomed up first if the grid is pooled) and, by default, calibrated to
the drawn control: each class keeps its best-scoring voxels up to the control's volume, the outer lesion with a
transmural-depth penalty bisected to the control's transmurality (the network alone makes lesions too
transmural; ``benchmarks/mask_realism.py --uncalibrated`` shows it). The result is clipped to the organ, made one
connected piece per class and nested (MVO inside MI, enclosed by it within the organ), giving a lesion map that
``placement.check_lesion_map`` accepts.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nnunet_lefusion import roi
from nnunet_lefusion.diffusion.lesion_maps import with_maps
from nnunet_lefusion.diffusion.loss import training_loss
from nnunet_lefusion.diffusion.sampler import RePaintSampler, SamplerConfig
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks.geometry import IN_PLANE, MyocardialCoordinates, Spacing, myocardial_coordinates
from nnunet_lefusion.masks.mask_data import (CONDITION_CHANNELS, ControlScale, LesionControl, MaskGrid, MaskPairs,
                                             OrganFrame, condition_maps, generation_region, organ_window)
from nnunet_lefusion.masks.metrics import region_transmurality
from nnunet_lefusion.masks.rule_based import CONNECTIVITY, largest_component
from nnunet_lefusion.model import Checkpoint, CheckpointMeta, ModelConfig, Unet3D, load_checkpoint
from nnunet_lefusion.training.loop import TrainConfig, TrainResult, train

MASK_KIND = "lefusion_mask_generator"
NUM_TIMESTEPS = 300
# Small enough to train on a CPU at native resolution (10 x 64 x 64): four levels starting only 8 channels wide,
# narrow attention and none at the two finest levels (slices mix through the attention across slices of the two
# coarser levels and the bottleneck). About 0.56 M parameters.
ARCHITECTURE = {"dim": 8, "dim_mults": [1, 2, 4, 8], "attn_heads": 2, "attn_dim_head": 16, "resnet_groups": 4,
                "linear_attn": [False, False, True, True], "temporal_attn": [False, False, True, True]}


def mask_model_config(num_lesions: int, architecture: ModelConfig | dict | None = None) -> ModelConfig:
    """The network for ``num_lesions`` lesion classes: ``architecture`` (default ``ARCHITECTURE``) with its
    channels set to masks + condition maps, one output per class and a condition vector of num_lesions + 1."""
    values = architecture.to_dict() if isinstance(architecture, ModelConfig) else dict(architecture or ARCHITECTURE)
    values.update(channels=num_lesions + len(CONDITION_CHANNELS), out_channels=num_lesions,
                  cond_dim=num_lesions + 1)
    return ModelConfig.from_dict(values)


class MaskLoss:
    """``loss_fn`` of the training loop: eps L1 over the organ's network-grid cells, summed over the classes."""

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS) -> None:
        self.schedule = CosineSchedule(num_timesteps)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0, maps = batch["x0"], batch["maps"]
        self.schedule = self.schedule.to(x0.device)
        region = generation_region(maps[:, :1]).expand_as(x0).float()
        return training_loss(with_maps(model, maps), self.schedule, x0, region, batch["cond"],
                             normalisation="lesion")


@dataclass(frozen=True)
class MaskModelMeta:
    """Everything sampling needs besides the weights.

    In a checkpoint (``model.checkpoint.CheckpointMeta``) it fills ``lesion_labels``, ``roi_size`` (the network
    grid) and ``extras`` (``kind`` = ``MASK_KIND``, label roles, grid, controls, scale); the model config and the
    schedule length are the checkpoint's own.
    """

    model_config: ModelConfig
    labels: LesionLabels
    grid: MaskGrid
    controls: tuple[LesionControl, ...]
    scale: ControlScale
    num_timesteps: int = NUM_TIMESTEPS

    def checkpoint_meta(self) -> CheckpointMeta:
        extras = {"kind": MASK_KIND, "labels": self.labels.to_dict(), "grid": self.grid.to_dict(),
                  "controls": [c.to_dict() for c in self.controls], "control_scale": self.scale.to_dict()}
        return CheckpointMeta(lesion_labels=list(self.labels.lesions), roi_size=list(self.grid.size), extras=extras)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, source: str | Path = "the checkpoint") -> "MaskModelMeta":
        extras = checkpoint.meta.extras if checkpoint.meta is not None else {}
        if extras.get("kind") != MASK_KIND:
            raise LeFusionError(f"{source} is not a lesion-mask generator checkpoint (kind {extras.get('kind')!r}).")
        return cls(checkpoint.config, LesionLabels.from_dict(extras["labels"]), MaskGrid.from_dict(extras["grid"]),
                   tuple(LesionControl.from_dict(c) for c in extras["controls"]),
                   ControlScale.from_dict(extras["control_scale"]), checkpoint.num_steps)


def train_mask_model(pairs: MaskPairs, config: ModelConfig, labels: LesionLabels, grid: MaskGrid,
                     out_dir: str | Path, train_config: TrainConfig, resume: bool = False,
                     training_data: dict | None = None) -> TrainResult:
    """Train a fresh (or resumed) mask generator network of ``config`` on ``pairs``; files go to ``out_dir``.
    ``training_data``: the cases ``pairs`` come from, recorded in the checkpoint (``nnunet.provenance``)."""
    factor = 2 ** (len(config.dim_mults) - 1)
    if grid.size[1] % factor or grid.size[2] % factor:
        raise LeFusionError(f"the network grid {grid.size[1:]} (window / pooling) must be divisible by {factor} "
                            f"in Y and X for a model of {len(config.dim_mults)} levels.")
    if config != mask_model_config(len(labels.lesions), config):
        raise LeFusionError(f"the model config's channels do not fit {len(labels.lesions)} lesion classes; build it "
                            f"with mask_model_config.")
    scale = ControlScale.fit(pairs.controls)
    meta = MaskModelMeta(config, labels, grid, tuple(pairs.controls), scale).checkpoint_meta()
    meta.training_data = training_data
    torch.manual_seed(train_config.seed)
    model = config.build()
    batch_size = train_config.batch_size
    return train(model, MaskLoss(), lambda rng: pairs.make_batch(rng, batch_size, scale), out_dir, meta,
                 train_config, resume=resume, num_timesteps=NUM_TIMESTEPS)


def _best(score: np.ndarray, within: np.ndarray, count: int) -> np.ndarray:
    """The largest connected piece of the ``count`` highest-scoring voxels of ``within``."""
    candidates = np.flatnonzero(within)
    best = np.zeros(within.shape, dtype=bool)
    best.flat[candidates[np.argsort(-score.flat[candidates], kind="stable")[:count]]] = True
    return largest_component(best)


def _grow(score: np.ndarray, within: np.ndarray, count: int) -> np.ndarray:
    """``count`` connected voxels of ``within`` (fewer only if its piece is smaller): grown from the best-scoring
    voxel, always by the best-scoring neighbour (``CONNECTIVITY``). Unlike ``_best`` it keeps the size when the
    scores are scattered, as an inner lesion's are inside a small outer one."""
    offsets = [o for o in np.argwhere(CONNECTIVITY) - 1 if o.any()]
    start = np.unravel_index(int(np.argmax(np.where(within, score, -np.inf))), within.shape)
    grown = np.zeros(within.shape, dtype=bool)
    queued = grown.copy()
    queued[start] = True
    heap = [(-float(score[start]), start)]
    while heap and count > 0:
        voxel = heapq.heappop(heap)[1]
        grown[voxel] = True
        count -= 1
        for offset in offsets:
            near = tuple(int(v) for v in np.add(voxel, offset))
            if all(0 <= v < n for v, n in zip(near, within.shape)) and within[near] and not queued[near]:
                queued[near] = True
                heapq.heappush(heap, (-float(score[near]), near))
    return grown


@dataclass(frozen=True)
class DepthTarget:
    """The transmurality an outer lesion must take (``metrics.transmurality``), on the host's coordinates."""

    coords: MyocardialCoordinates
    transmurality: float
    max_penalty: float = 8.0
    iterations: int = 10

    def piece(self, score: np.ndarray, within: np.ndarray, count: int) -> np.ndarray:
        """``_best`` of ``score`` less a penalty on transmural depth, the penalty bisected until the piece's
        transmurality is nearest the target. Infarcts grow from the endocardium outward, so a lesion made less
        transmural at a fixed volume keeps its deepest-scoring voxels near the endocardium and spreads along the
        wall instead. A piece that is not too transmural without penalty is returned as it is."""
        depth = np.nan_to_num((self.coords.inner + self.coords.outer) / 2)
        low, high = 0.0, self.max_penalty
        best = _best(score, within, count)
        error = region_transmurality(best, self.coords) - self.transmurality
        for _ in range(self.iterations if error > 0 else 0):
            middle = (low + high) / 2
            piece = _best(score - middle * depth, within, count)
            gap = region_transmurality(piece, self.coords) - self.transmurality
            if abs(gap) < abs(error):
                best, error = piece, gap
            low, high = (middle, high) if gap > 0 else (low, middle)
        return best


def _piece(score: np.ndarray, within: np.ndarray, target: float, proper: bool, match_size: bool,
           depth: DepthTarget | None = None) -> np.ndarray:
    """One connected piece of ``within``: the largest where ``score`` > 0, or with ``match_size`` (or when that
    is empty) the best-scoring ``target`` voxels, calibrated to ``depth`` when given. ``proper`` (an inner lesion):
    leave at least one voxel of ``within`` out, and with ``match_size`` grow the piece to its size (``_grow``)."""
    size = int(within.sum())
    if size - proper < 1:
        raise LeFusionError("the generated lesion is too small to hold an inner lesion.")
    count = int(np.clip(round(target), 1, size - proper))
    if match_size:
        piece = (depth.piece(score, within, count) if depth is not None
                 else _grow(score, within, count) if proper else _best(score, within, count))
    else:
        piece = largest_component((score > 0) & within)
    if not piece.any():
        piece = _best(score, within, count)
    if proper and int(piece.sum()) == size:
        members = np.flatnonzero(piece)
        piece.flat[members[np.argmin(score.flat[members])]] = False
    return piece


def enclosed_part(outer: np.ndarray, host: np.ndarray) -> np.ndarray:
    """Where an inner lesion may lie in ``outer``: its voxels with no in-plane neighbour in the rest of the host
    organ, so that the outer lesion encloses the inner one within the organ (it may touch the cavity and the
    organ's outer border), as infarct encloses real no-reflow; all of ``outer`` when no voxel lies that deep."""
    core = outer & ~ndimage.binary_dilation(host & ~outer, structure=IN_PLANE)
    return core if core.any() else outer


def assemble_lesion_map(scores: np.ndarray, host: np.ndarray, labels: LesionLabels, fractions: Sequence[float],
                        match_size: bool = False, dtype: np.dtype = np.uint8,
                        depth: DepthTarget | None = None) -> np.ndarray:
    """A lesion map from per-class scores (K, Z, Y, X) on the native grid (lesion where > 0).

    Class k is present when ``fractions[k]`` > 0: its largest connected piece inside the host organ (class 0) or
    inside the enclosed part of the class around it (``enclosed_part``), never all of it. An empty prediction
    falls back to the best-scoring voxels, as many as the fraction of the host asks, so every class asked for is
    present; ``match_size`` always takes that many (DiffMask-style thresholding to a target size; the largest
    connected piece of them is kept) and, with ``depth``, calibrates the outer class's transmurality
    (``DepthTarget``).
    """
    lesion_map = np.zeros(host.shape, dtype=dtype)
    within = host
    for k, (label, fraction) in enumerate(zip(labels.lesions, fractions)):
        if fraction <= 0:
            break
        region = within if k == 0 else enclosed_part(within, host)
        within = _piece(scores[k], region, fraction * host.sum(), k > 0, match_size, depth if k == 0 else None)
        lesion_map[within] = label
    return lesion_map


class LearnedMaskGenerator:
    """A ``placement.MaskGenerator`` backed by a trained mask diffusion model.

    ``sampler``: how to walk the reverse process (default: 50 strided DDIM steps, no jumps); ``rotation_jitter``:
    the drawn control's offset turns about the LV centre by up to this many degrees either way; ``calibrate``
    (default): each lesion takes exactly the drawn control's volume and the outer one its transmurality
    (``assemble_lesion_map``, ``DepthTarget``), otherwise the network's own lesion (score > 0); ``batch_size``:
    masks sampled together by ``generate_many``.
    """

    def __init__(self, model: Unet3D, meta: MaskModelMeta, sampler: SamplerConfig | None = None,
                 rotation_jitter: float = 15.0, calibrate: bool = True, batch_size: int = 8) -> None:
        self.model = model.eval()
        self.meta = meta
        self.labels = meta.labels
        self.sampler = (sampler or SamplerConfig(jump_length=1, jump_n_sample=1, strided_steps=50)).validate()
        self.schedule = CosineSchedule(meta.num_timesteps)
        self.rotation_jitter = float(rotation_jitter)
        self.calibrate = bool(calibrate)
        self.batch_size = int(batch_size)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", use_ema: bool = True, **kwargs) -> "LearnedMaskGenerator":
        """A generator from a checkpoint written by ``train_mask_model`` (EMA weights unless ``use_ema`` is off)."""
        checkpoint = load_checkpoint(path)
        meta = MaskModelMeta.from_checkpoint(checkpoint, path)
        return cls(checkpoint.build("ema" if use_ema else "model").to(device), meta, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, label_map: np.ndarray, rng: np.random.Generator, want_classes: Sequence[int] | None = None,
                 spacing: Spacing = (1.0, 1.0, 1.0)) -> np.ndarray:
        """A lesion map (lesion labels, 0 elsewhere) of the shape of ``label_map``, inside its host organ.

        ``want_classes``: the lesion labels the result must contain (an inner lesion brings the lesions around it,
        and ``(outer,)`` alone means no inner lesion); ``None`` draws them as often as in the training data.
        """
        return self.generate_many([label_map], rng, want_classes, [spacing])[0]

    def generate_many(self, label_maps: Sequence[np.ndarray], rng: np.random.Generator,
                      want_classes: Sequence[int] | None = None,
                      spacings: Sequence[Spacing] | None = None) -> list[np.ndarray]:
        """``generate`` for several label maps, sampled in batches of ``batch_size``."""
        spacings = list(spacings) if spacings is not None else [(1.0, 1.0, 1.0)] * len(label_maps)
        if len(spacings) != len(label_maps):
            raise LeFusionError(f"got {len(label_maps)} label maps but {len(spacings)} spacings.")
        levels = self._levels(want_classes)
        results = []
        for start in range(0, len(label_maps), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(label_maps)))
            results += self._sample([label_maps[i] for i in chunk], [spacings[i] for i in chunk], levels, rng)
        return results

    def _levels(self, want_classes: Sequence[int] | None) -> int | None:
        """How many lesion classes (outer first) each mask must have; None: as drawn."""
        if want_classes is None:
            return None
        lesions = self.labels.lesions
        if not want_classes or set(want_classes) - set(lesions):
            raise LeFusionError(f"want_classes must be a non-empty subset of the lesion labels {lesions}, "
                                f"got {list(want_classes)}")
        return 1 + max(lesions.index(label) for label in want_classes)

    def _draw(self, rng: np.random.Generator, levels: int | None) -> LesionControl:
        controls = [c for c in self.meta.controls if levels is None or sum(f > 0 for f in c.fractions) == levels]
        if not controls:
            raise LeFusionError(f"the generator's training data has no lesion with exactly the classes "
                                f"{list(self.labels.lesions[:levels])}.")
        return controls[int(rng.integers(len(controls)))]

    def _prepare(self, label_map: np.ndarray, spacing: Spacing, levels: int | None, rng: np.random.Generator
                 ) -> tuple[OrganFrame, roi.RoiSpec, LesionControl, np.ndarray]:
        """One case's organ frame, window, drawn control and condition maps."""
        if np.asarray(label_map).ndim != 3:
            raise LeFusionError(f"a label map must be a 3D (Z, Y, X) array, got shape {np.shape(label_map)}")
        frame = OrganFrame.of(label_map, self.labels, spacing)
        control = self._draw(rng, levels)
        rotation = np.radians(rng.uniform(-self.rotation_jitter, self.rotation_jitter))
        spec = organ_window(label_map, self.labels, self.meta.grid)
        region = control.region(frame, spacing, rotation)
        return frame, spec, control, condition_maps(label_map, self.labels, region, spec, self.meta.grid.pool)

    def _sample(self, label_maps: list[np.ndarray], spacings: list[Spacing], levels: int | None,
                rng: np.random.Generator) -> list[np.ndarray]:
        grid, labels = self.meta.grid, self.labels
        frames, specs, controls, maps = zip(*(self._prepare(m, s, levels, rng) for m, s in zip(label_maps, spacings)))
        device = self.device
        maps_t = torch.from_numpy(np.stack(maps)).to(device)
        region = generation_region(maps_t[:, 0])
        cond = torch.from_numpy(self.meta.scale.apply(controls)).to(device)
        generator = torch.Generator(device).manual_seed(int(rng.integers(2 ** 62)))
        # Every mask channel is generated over the organ's cells ("lesion" label 1 there); elsewhere the known
        # image is -1. ``channels`` is the final clamped x0 of each channel.
        sampler = RePaintSampler(with_maps(self.model, maps_t), self.schedule, self.sampler)
        known = torch.full(region.shape, -1.0, device=device)
        result = sampler.sample(known, region.long(), (1,) * len(labels.lesions), cond, generator)
        scores = F.interpolate(result.channels, scale_factor=(1, grid.pool, grid.pool), mode="trilinear",
                               align_corners=False).cpu().numpy()
        lesion_maps = []
        for label_map, spacing, frame, spec, control, window in zip(label_maps, spacings, frames, specs, controls,
                                                                    scores):
            native = np.stack([roi.paste(np.full(label_map.shape, -1.0, np.float32), channel,
                                         np.ones(grid.window, dtype=bool), spec) for channel in window])
            depth = (DepthTarget(myocardial_coordinates(label_map, labels, spacing), control.transmurality)
                     if self.calibrate else None)
            lesion_maps.append(assemble_lesion_map(native, frame.host, labels, control.fractions, self.calibrate,
                                                   label_map.dtype, depth))
        return lesion_maps
