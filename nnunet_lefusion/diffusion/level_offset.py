"""Lesion levels carried by the condition: what a level-offset sampler generates, and what is added back.

The official network must find a lesion's intensity level in its histogram condition, which its per-voxel loss
barely rewards: at high noise, where the level is set, it regresses to a level learnt from all training lesions,
and the sampled lesions sit between their condition and the surrounding tissue. A level-offset sampler is trained
on ROIs whose lesion voxels of class k are moved by minus level_k, the mean of class k's histogram condition: its
network generates every lesion around 0, a level that never changes, and its texture and spread from the
condition; sampling centres class k's voxels on 0 (``centred``) and adds level_k back. So the lesion's level
follows its condition by construction (for a training cluster: the cluster's level moved onto the target's organ)
and the network makes everything else.
"""
from __future__ import annotations

import torch

from nnunet_lefusion.diffusion.lesion_maps import histogram_levels
from nnunet_lefusion.diffusion.loss import masked_means


def offset_map(masks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W): on the voxels of class k (``masks`` (B, K, D, H, W)), the mean level of class k's block of
    ``cond`` (B, K x bins, any positive scale); 0 elsewhere. A level-offset network learns the ROI minus this map,
    and its samples get it added back."""
    levels = histogram_levels(cond, masks.shape[1]).to(masks.device)
    return (masks.float() * levels[:, :, None, None, None]).sum(dim=1, keepdim=True)


def centred(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``x`` (B, K, D, H, W), a level-offset network's channels, with each class's lesion mean removed from its
    voxels (channel k over ``masks[:, k]``, per ROI); other voxels unchanged. The network generates the lesions
    around 0, but a lesion's own mean drifts from 0 over the walk by a few hundredths of [-1, 1], as much as a small
    lesion's spread: centred, the lesion's level is its condition's exactly, and its texture and spread the
    network's."""
    return x - masks.to(x.dtype) * masked_means(x, masks)[:, :, None, None, None]
