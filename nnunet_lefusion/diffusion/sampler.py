"""Background-preserving RePaint sampler of LeFusion: the official jump schedule and a fast strided mode.

At every network evaluation the known region (everything outside the lesion union) is replaced by the
forward-noised real image at the same t (fresh noise each time), x0 is predicted from eps and clamped to
[-1, 1], then the step goes down (DDPM posterior, or DDIM between strided timesteps) or, on a jump, back up.
The result takes channel k on lesion class k and keeps the input voxels everywhere else; a second result has each
lesion class's voxels moved onto its histogram condition (rank-preserving), which makes the texture control exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from nnunet_lefusion.diffusion.histograms import match_histogram
from nnunet_lefusion.diffusion.jump import count_evaluations, jump_schedule, strided_jump_schedule
from nnunet_lefusion.diffusion.lesion_maps import lesion_denoiser
from nnunet_lefusion.diffusion.level_offset import centred, offset_map
from nnunet_lefusion.diffusion.loss import Denoiser, lesion_channel_masks
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.precision import cpu_has_native_bf16

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def fast_precision(device: torch.device) -> str:
    """"bf16" on CPUs with AVX512-BF16 or AMX (about 1.5x the fp32 sampling speed on this project's CPU), else
    "fp32": also on CUDA, where the small windows leave the GPU bound by kernel launches and bf16 autocast measured
    slower (H200: 114 vs 146 fast-mode cases per minute, ``benchmarks/synthesis_throughput.py``)."""
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class SamplerConfig:
    """How to walk the reverse process.

    ``strided_steps=None`` walks every timestep with DDPM steps (official). An integer K walks K strided
    timesteps (``spacing_power`` 1: evenly spread; > 1: denser at low noise) with DDIM steps (stochasticity
    ``eta``); the RePaint jumps then count in strided steps. ``jump_below`` < 1 resamples only in that lower
    fraction of the schedule (low noise). ``precision`` autocasts the network ("fp32", "fp16", "bf16"; None:
    fp32 here, the device's fast one for ``LesionSampler``, see :func:`fast_precision`); ``compile`` wraps it in
    ``torch.compile``. ``guidance`` w is classifier-free guidance: with a condition,
    eps = eps_null + w (eps_cond - eps_null) (1 or None: the conditional network alone, official; > 1 follows
    the histogram condition more closely, at two network passes per evaluation; needs a network trained with
    condition dropout; None lets ``LesionSampler`` use its checkpoint's value).
    """

    jump_length: int = 5
    jump_n_sample: int = 5
    strided_steps: int | None = None
    eta: float = 0.0
    spacing_power: float = 1.0
    jump_below: float = 1.0
    precision: str | None = "fp32"
    compile: bool = False
    guidance: float | None = None

    @classmethod
    def official(cls, jump_length: int = 5, jump_n_sample: int = 5, **kwargs) -> "SamplerConfig":
        """The official schedule (both LeFusion shell scripts use 5/5: 1,480 evaluations at T=300)."""
        return cls(jump_length=jump_length, jump_n_sample=jump_n_sample, **kwargs)

    @classmethod
    def fast(cls, **kwargs) -> "SamplerConfig":
        """Fast mode: 45 timesteps spaced quadratically (dense at low noise), DDIM steps with eta 1, each step in
        the lowest 40 % resampled 6 times (jumps of one stride): 128 evaluations.

        Chosen on ``benchmarks/sampler_speed.py --quality`` (exact denoiser of a Gaussian field): resampling
        harmonises most at low noise, where the official schedule jumps as often as anywhere; this schedule
        matched or beat the official 5/5 (1,480 evaluations) on both the mean error and the excess variance,
        over several seeds, where 50 evenly strided steps resampled 3 times did not.
        """
        return cls(**{"jump_length": 1, "jump_n_sample": 6, "strided_steps": 45, "eta": 1.0, "spacing_power": 2.0,
                      "jump_below": 0.4, **kwargs})

    def validate(self) -> "SamplerConfig":
        if self.precision is not None and self.precision not in PRECISIONS:
            raise LeFusionError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}.")
        if self.strided_steps is not None and self.strided_steps < 1:
            raise LeFusionError(f"the number of strided steps must be >= 1, got {self.strided_steps}.")
        if not 0.0 <= self.eta <= 1.0:
            raise LeFusionError(f"eta must be in [0, 1], got {self.eta}.")
        if not 0.0 < self.jump_below <= 1.0:
            raise LeFusionError(f"jump_below must be in (0, 1], got {self.jump_below}.")
        if self.guidance is not None and not 0.0 <= self.guidance <= 20.0:
            raise LeFusionError(f"guidance must be in [0, 20], got {self.guidance}.")
        return self

    def time_list(self, num_steps: int) -> list[int]:
        """The time list (ending at -1) this configuration walks on a schedule of ``num_steps``."""
        if self.strided_steps is None:
            return jump_schedule(num_steps, self.jump_length, self.jump_n_sample, self.jump_below)
        return strided_jump_schedule(num_steps, self.strided_steps, self.jump_length, self.jump_n_sample,
                                     self.spacing_power, self.jump_below)

    def evaluations(self, num_steps: int) -> int:
        """Network evaluations per batch of ROIs."""
        return count_evaluations(self.time_list(num_steps))


@dataclass
class SampleResult:
    """Sampled ROIs and the network evaluations made (per ROI; the batch shares them).

    ``image`` (B, D, H, W): input voxels outside the lesions, channel k of ``channels`` on lesion class k.
    ``matched``: ``image`` with each lesion class's voxels histogram-matched to its block of the condition
    (``match_histogram``; a class whose block is empty keeps the network's values); None unless asked for.
    ``channels`` (B, K, D, H, W): the final clamped x0 of every channel over the whole ROI.
    """

    image: torch.Tensor
    matched: torch.Tensor | None
    channels: torch.Tensor
    evaluations: int


class RePaintSampler:
    """Samples lesion textures inside given lesion masks, keeping the rest of each ROI.

    ``lesion_aware``: the denoiser also takes the lesion maps of ``diffusion.lesion_maps`` (made here from the
    masks and the condition; the null condition of guidance gets maps without levels).
    """

    def __init__(self, denoiser: Denoiser, schedule: CosineSchedule, config: SamplerConfig | None = None,
                 lesion_aware: bool = False):
        self.config = (config or SamplerConfig.official()).validate()
        self.schedule = schedule
        self.denoiser = torch.compile(denoiser) if self.config.compile else denoiser
        self.lesion_aware = lesion_aware

    def _eps(self, denoisers: tuple[Denoiser, Denoiser], x: torch.Tensor, t: torch.Tensor,
             cond: torch.Tensor | None) -> torch.Tensor:
        dtype = PRECISIONS[self.config.precision or "fp32"]
        conditional, null = denoisers
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            eps = conditional(x, t, cond)
            if cond is not None and self.config.guidance not in (None, 1.0):
                unconditional = null(x, t, None)
                eps = unconditional + self.config.guidance * (eps - unconditional)
        return eps.float()

    def _step_down(self, x: torch.Tensor, x0: torch.Tensor, t: int, s: int,
                   randn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One reverse step from timestep t to s < t given the clamped x0 estimate."""
        if s < 0:
            return x0
        sched = self.schedule
        if self.config.strided_steps is None:  # official DDPM posterior step (s == t - 1)
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            mean, _, log_var = sched.posterior(x0, x, tt)
            return mean + torch.exp(0.5 * log_var) * randn()
        ab_t, ab_s = sched.alpha_bar(t), sched.alpha_bar(s)
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1.0 - ab_t)
        sigma = self.config.eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
        out = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - sigma ** 2, 0.0)) * eps
        return out + sigma * randn() if sigma > 0 else out

    def _step_up(self, x: torch.Tensor, t: int, s: int, noise: torch.Tensor) -> torch.Tensor:
        """A RePaint jump from t to s > t: ``undo`` with beta_{t+1} for one step, q(x_s | x_t) for a stride."""
        if s == t + 1:
            return self.schedule.undo(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), noise)
        return self.schedule.renoise(x, t, s, noise)

    def sample(self, image: torch.Tensor, label: torch.Tensor, lesion_labels: Sequence[int],
               cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               histogram_matching: bool = False, level_offset: bool = False) -> SampleResult:
        """New lesion textures for a batch of ROIs.

        ``image`` (B, D, H, W) in [-1, 1]; ``label`` (B, D, H, W) class map; channel k of the network is
        lesion class ``lesion_labels[k]``; ``cond`` (B, cond_dim) or one (cond_dim,) row for the whole batch.
        Voxels outside the lesion classes are returned unchanged (the same values as ``image``).
        ``histogram_matching``: ``cond`` is one histogram per lesion class; also return the matched image.
        ``level_offset``: the network generates lesions around 0; class k's voxels are centred on 0 and get the mean
        level of its block of ``cond`` added (clipped to [-1, 1]; ``diffusion.level_offset``).
        """
        if image.dim() != 4 or image.shape != label.shape:
            raise LeFusionError(f"image {tuple(image.shape)} and label {tuple(label.shape)} must be (B, D, H, W).")
        self.schedule = sched = self.schedule.to(image.device)
        masks = lesion_channel_masks(label.to(image.device), lesion_labels).bool()
        b, k = masks.shape[:2]
        known = ~masks.any(dim=1, keepdim=True)
        gt = image.float()[:, None].expand(b, k, *image.shape[1:])
        if (histogram_matching or level_offset) and (cond is None or cond.shape[-1] % k):
            raise LeFusionError(f"histogram matching and a level offset need a condition of one histogram per lesion "
                                f"class ({k}).")
        if cond is not None:
            cond = cond.to(image.device, torch.float32).expand(b, -1) if cond.dim() == 1 else cond.to(image.device)

        denoisers = tuple(lesion_denoiser(self.denoiser, masks, c, self.lesion_aware) for c in (cond, None))

        def randn() -> torch.Tensor:
            return torch.randn(gt.shape, generator=generator, device=gt.device, dtype=torch.float32)

        times = self.config.time_list(sched.num_steps)
        evaluations = 0
        with torch.inference_mode():
            x = randn()
            for t, s in zip(times[:-1], times[1:]):
                if s > t:
                    x = self._step_up(x, t, s, randn())
                    continue
                tt = torch.full((b,), t, device=x.device, dtype=torch.long)
                x = torch.where(known, sched.q_sample(gt, tt, randn()), x)
                x0 = sched.predict_x0_from_eps(x, tt, self._eps(denoisers, x, tt, cond)).clamp(-1.0, 1.0)
                x = self._step_down(x, x0, t, s, randn)
                evaluations += 1
            out = image.clone()
            lesions = (centred(x, masks) + offset_map(masks, cond)).clamp(-1.0, 1.0) if level_offset else x
            for c in range(k):
                out[masks[:, c]] = lesions[:, c][masks[:, c]].to(out.dtype)
            matched = self._match(out, masks, cond) if histogram_matching else None
        return SampleResult(out, matched, x, evaluations)

    @staticmethod
    def _match(image: torch.Tensor, masks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``image`` with lesion class k of each ROI histogram-matched to block k of its condition."""
        out = image.clone()
        blocks = cond.reshape(cond.shape[0], masks.shape[1], -1)
        for b in range(image.shape[0]):
            for c in range(masks.shape[1]):
                voxels = masks[b, c]
                out[b][voxels] = match_histogram(image[b][voxels], blocks[b, c])
        return out
