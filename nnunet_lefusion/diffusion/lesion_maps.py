"""Spatial condition of a lesion-aware denoiser: where each lesion class lies, and the level its histogram asks.

The official network sees only the noisy image: it never learns where the lesion is, so at high noise it cannot
put the histogram's intensity level on the lesion's voxels and takes the level from the surrounding tissue. A
lesion-aware network (model config with 3 K input channels for K lesion classes) also sees, per class, the lesion
mask and the mask times the mean of that class's histogram condition; both come from what sampling knows anyway
(the masks to fill and the condition), so the network follows its histogram condition without any matching.
"""
from __future__ import annotations

from typing import Callable

import torch

from nnunet_lefusion.diffusion.loss import Denoiser
from nnunet_lefusion.errors import LeFusionError

MAPS_PER_CLASS = 2  # the mask, the mask times the class's histogram level


def is_lesion_aware(channels: int, out_channels: int) -> bool:
    """Whether a network of these channel counts takes the lesion maps (in = (1 + MAPS_PER_CLASS) x out);
    ``LeFusionError`` for any other count than that or in = out (the official network)."""
    if channels == out_channels:
        return False
    if channels == (1 + MAPS_PER_CLASS) * out_channels:
        return True
    raise LeFusionError(f"a LeFusion sampler network has as many input channels as lesion classes ({out_channels}), "
                        f"or {(1 + MAPS_PER_CLASS) * out_channels} with the lesion maps; got {channels}.")


def histogram_levels(cond: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean intensity in [-1, 1] of each class's histogram block of ``cond`` (B, K x bins), or of one (K x bins)
    row for a whole batch, read at the bin centres; any positive scale of a block gives the same level, an empty
    block gives 0. Returns (B, K), or (1, K) for one row."""
    blocks = cond.float().reshape(-1, num_classes, cond.shape[-1] // num_classes).clamp_min(0.0)
    bins = blocks.shape[-1]
    centres = -1.0 + (torch.arange(bins, device=cond.device, dtype=torch.float32) + 0.5) * (2.0 / bins)
    total = blocks.sum(dim=-1)
    return torch.where(total > 0, (blocks * centres).sum(dim=-1) / total.clamp_min(1e-12), torch.zeros_like(total))


def lesion_maps(masks: torch.Tensor, levels: torch.Tensor | None) -> torch.Tensor:
    """The maps (B, 2 K, D, H, W) a lesion-aware network sees beside the noisy image: the K class ``masks``
    (B, K, D, H, W) then each mask times its ``levels`` (B, K) entry (None, the null condition: zeros)."""
    masks = masks.float()
    level_maps = torch.zeros_like(masks) if levels is None else masks * levels.to(masks)[:, :, None, None, None]
    return torch.cat((masks, level_maps), dim=1)


def with_maps(model: Callable[..., torch.Tensor], maps: torch.Tensor) -> Denoiser:
    """The denoiser of the image channels alone: ``model`` sees them concatenated with ``maps``."""
    return lambda x, t, cond: model(torch.cat((x, maps.to(x)), dim=1), t, cond)


def lesion_denoiser(model: Callable[..., torch.Tensor], masks: torch.Tensor, cond: torch.Tensor | None,
                    lesion_aware: bool) -> Denoiser:
    """``model`` as the denoiser of the image channels under ``cond`` (None: the null condition), given the lesion
    maps of ``masks`` and ``cond`` if it is ``lesion_aware``."""
    if not lesion_aware:
        return model
    return with_maps(model, lesion_maps(masks, None if cond is None else histogram_levels(cond, masks.shape[1])))
