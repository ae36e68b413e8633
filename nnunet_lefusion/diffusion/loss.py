"""Lesion-focused eps-prediction loss of LeFusion with one network channel per lesion class."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
NORMALISATIONS = ("volume", "lesion")


def lesion_channel_masks(label: torch.Tensor, lesion_labels: Sequence[int]) -> torch.Tensor:
    """Float masks (B, K, D, H, W), channel k = (label == lesion_labels[k]); ``label`` is (B, D, H, W).

    Emidec: ``lesion_labels=(3, 4)`` gives channel 0 = infarct, channel 1 = no-reflow.
    """
    if label.dim() != 4:
        raise LeFusionError(f"label maps must be (B, D, H, W), got shape {tuple(label.shape)}.")
    if not lesion_labels:
        raise LeFusionError("at least one lesion label is needed for the lesion-focused loss.")
    return torch.stack([label == int(v) for v in lesion_labels], dim=1).float()


def lesion_l1_loss(eps_hat: torch.Tensor, eps: torch.Tensor, masks: torch.Tensor,
                   normalisation: str = "volume") -> torch.Tensor:
    """L1 between true and predicted noise, restricted per channel to that channel's lesion mask.

    ``normalisation="volume"`` (official LeFusion): sum over channels k of the mean over ALL voxels (batch
    included) of |m_k (eps_k - eps_hat_k)|, so small lesions weigh less. ``"lesion"``: the sum over channels
    of the mean over that channel's lesion voxels only. A class absent from the batch adds 0 either way.
    """
    if not (eps_hat.shape == eps.shape == masks.shape):
        raise LeFusionError(f"loss inputs disagree in shape: {tuple(eps_hat.shape)}, {tuple(eps.shape)}, "
                            f"{tuple(masks.shape)}.")
    if normalisation not in NORMALISATIONS:
        raise LeFusionError(f"loss normalisation must be one of {NORMALISATIONS}, got {normalisation!r}.")
    masks = masks.to(eps_hat.dtype)
    per_voxel = (masks * (eps - eps_hat)).abs()
    dims = [d for d in range(per_voxel.dim()) if d != 1]
    if normalisation == "volume":
        per_channel = per_voxel.mean(dim=dims)
    else:
        per_channel = per_voxel.sum(dim=dims) / masks.sum(dim=dims).clamp(min=1.0)
    return per_channel.sum()


def masked_means(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, K): the mean of ``x`` (B, K, ...) over each sample's and channel's ``masks`` voxels (0 without any)."""
    masks = masks.to(x.dtype)
    dims = tuple(range(2, x.dim()))
    return (x * masks).sum(dim=dims) / masks.sum(dim=dims).clamp(min=1.0)


def lesion_mean_loss(eps_hat: torch.Tensor, eps: torch.Tensor, masks: torch.Tensor,
                     x0_scale: torch.Tensor) -> torch.Tensor:
    """|lesion mean of the eps error| per sample and channel, in clean-image units: times ``x0_scale`` (B,) =
    sqrt((1 - abar_t) / abar_t), the factor an eps error has in the predicted x0. Sum over channels, mean over the
    batch; a channel without lesion voxels adds 0.

    The per-voxel L1 barely sees a lesion-wide offset at high noise, where only the condition tells the lesion's
    level: this term is what makes a network read its histogram condition for the lesion's mean intensity.
    """
    offset = masked_means(eps_hat - eps, masks)
    present = masks.flatten(2).any(dim=2)
    return (offset.abs() * x0_scale[:, None] * present).sum(dim=1).mean()


def training_loss(denoiser: Denoiser, schedule: CosineSchedule, x0: torch.Tensor, masks: torch.Tensor,
                  cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  normalisation: str = "volume", mean_weight: float = 0.0, mean_scale_max: float = 10.0
                  ) -> torch.Tensor:
    """One LeFusion training loss: t ~ U{0..T-1}, fresh noise on every channel, lesion-focused L1 (official),
    plus ``mean_weight`` times :func:`lesion_mean_loss` with its x0 factor capped at ``mean_scale_max`` (0: off).

    ``x0`` (B, K, D, H, W) is the clean ROI in [-1, 1] repeated over the K lesion channels; ``masks`` comes
    from :func:`lesion_channel_masks`.
    """
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_steps, (b,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    eps_hat = denoiser(schedule.q_sample(x0, t, noise), t, cond)
    loss = lesion_l1_loss(eps_hat, noise, masks, normalisation)
    if mean_weight:
        x0_scale = schedule.buffers["sqrt_recipm1_alphas_cumprod"].to(x0.device)[t].clamp(max=mean_scale_max)
        loss = loss + mean_weight * lesion_mean_loss(eps_hat.float(), noise.float(), masks, x0_scale.float())
    return loss
