"""LeFusion diffusion: cosine schedule, RePaint jump schedule, lesion-focused loss, sampler, histograms."""
from nnunet_lefusion.diffusion.histograms import (
    HistogramClusters, choose_condition, cluster_histograms, lesion_histograms, perturb_histogram)
from nnunet_lefusion.diffusion.jump import count_evaluations, jump_schedule, strided_jump_schedule
from nnunet_lefusion.diffusion.loss import lesion_channel_masks, lesion_l1_loss, training_loss
from nnunet_lefusion.diffusion.sampler import RePaintSampler, SampleResult, SamplerConfig
from nnunet_lefusion.diffusion.schedule import CosineSchedule

__all__ = [
    "CosineSchedule", "HistogramClusters", "RePaintSampler", "SampleResult", "SamplerConfig", "choose_condition",
    "cluster_histograms", "count_evaluations", "jump_schedule", "lesion_channel_masks", "lesion_histograms",
    "lesion_l1_loss", "perturb_histogram", "strided_jump_schedule", "training_loss",
]
