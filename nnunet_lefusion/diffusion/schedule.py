"""Cosine noise schedule of LeFusion (s=0.008, eps-prediction, fixed posterior variance).

Coefficients are computed in float64 and exposed as float32 tensors, exactly as the official
``GaussianDiffusion_Nolatent`` registers its buffers, so they can be written into checkpoints.
"""
from __future__ import annotations

import copy
import math

import torch

from nnunet_lefusion.errors import LeFusionError

BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.9999) -> torch.Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal), float64, clipped to ``max_beta``."""
    x = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64)
    f = torch.cos(((x / num_steps) + s) / (1 + s) * math.pi * 0.5) ** 2
    f = f / f[0]
    return torch.clip(1 - f[1:] / f[:-1], 0, max_beta)


def _extract(buf: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather ``buf[t]`` and shape it (B, 1, ..., 1) to broadcast against ``x``."""
    out = buf.to(x.device)[t.to(x.device).long()]
    return out.to(x.dtype).reshape(t.shape[0], *((1,) * (x.dim() - 1)))


class CosineSchedule:
    """Cosine diffusion schedule with ``num_steps`` steps (official LeFusion: 300)."""

    def __init__(self, num_steps: int = 300) -> None:
        if num_steps < 2:
            raise LeFusionError(f"The diffusion schedule needs at least 2 steps, got {num_steps}.")
        self.num_steps = int(num_steps)
        betas = cosine_betas(self.num_steps)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self._alphas_cumprod64 = alphas_cumprod
        buffers64 = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": prev,
            "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
            "posterior_mean_coef1": betas * torch.sqrt(prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        self.buffers: dict[str, torch.Tensor] = {name: buffers64[name].to(torch.float32) for name in BUFFER_NAMES}

    def official_buffers(self) -> dict[str, torch.Tensor]:
        """The 12 schedule buffers under their official names, each a (T,) float32 tensor (copies)."""
        return {name: buf.clone() for name, buf in self.buffers.items()}

    def to(self, device: torch.device | str) -> "CosineSchedule":
        """A copy of this schedule whose float32 buffers live on ``device``."""
        moved = copy.copy(self)
        moved.buffers = {name: buf.to(device) for name, buf in self.buffers.items()}
        return moved

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise clean ``x0`` to step ``t``: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (_extract(self.buffers["sqrt_alphas_cumprod"], t, x0) * x0
                + _extract(self.buffers["sqrt_one_minus_alphas_cumprod"], t, x0) * noise)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate from the predicted noise (official ``predict_start_from_noise``)."""
        return (_extract(self.buffers["sqrt_recip_alphas_cumprod"], t, x_t) * x_t
                - _extract(self.buffers["sqrt_recipm1_alphas_cumprod"], t, x_t) * eps)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (_extract(self.buffers["posterior_mean_coef1"], t, x_t) * x0
                + _extract(self.buffers["posterior_mean_coef2"], t, x_t) * x_t)
        variance = _extract(self.buffers["posterior_variance"], t, x_t)
        log_variance = _extract(self.buffers["posterior_log_variance_clipped"], t, x_t)
        return mean, variance, log_variance

    def undo(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Re-noise x_t to x_{t+1} with beta_{t+1} (the official RePaint ``undo`` step)."""
        if int(t.max()) + 1 >= self.num_steps:
            raise ValueError(f"undo from t={int(t.max())} would leave the schedule of {self.num_steps} steps")
        beta = _extract(self.buffers["betas"], t + 1, x)
        return torch.sqrt(1.0 - beta) * x + torch.sqrt(beta) * noise

    def renoise(self, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
        """Jump forward from step ``t_from`` to a later step ``t_to`` in one go, q(x_{t_to} | x_{t_from}).

        ``t_from = -1`` means the clean image. The ratio abar_to / abar_from is formed in float64.
        """
        if not -1 <= t_from < t_to < self.num_steps:
            raise ValueError(f"renoise needs -1 <= t_from < t_to < {self.num_steps}, got {t_from} -> {t_to}")
        ratio = float(self.alpha_bar(t_to) / self.alpha_bar(t_from))
        return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise

    def alpha_bar(self, t: int) -> float:
        """abar_t in float64 precision; ``t = -1`` gives 1 (the clean image)."""
        return 1.0 if t < 0 else float(self._alphas_cumprod64[t])
