"""LeFusion diffusion: cosine schedule, RePaint jump schedule, lesion-focused loss, sampler, histograms."""
