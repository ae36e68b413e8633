"""Does a sampler's network use its histogram condition? One-step x0 predictions inside real lesions, by noise level.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.condition_response --checkpoint CKPT --raw RAW_DATASET_FOLDER
[--cases 4] [--timesteps 299 250 200 150 100 50]``.

For held-out lesion ROIs, the real image is forward-noised to step t and the network predicts x0 under four
conditions: the lesion's own histograms, a bright one (every class in the top bin but one), a dark one (every
class in the second bin) and the learned null condition. Per t it prints the mean absolute error of the lesion
mean under the own histogram, and the response: how far the predicted lesion mean moves from the dark to the
bright condition (ROI units, [-1, 1]; the two bins are 1.625 apart). A network that ignores its condition
answers about 0 and can only harmonise lesions to their surroundings, which is what the sampler then does
(``lesion_quality.py``, rows without histogram matching).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nnunet_lefusion.diffusion.histograms import NUM_BINS, lesion_histograms
from nnunet_lefusion.diffusion.lesion_maps import lesion_denoiser
from nnunet_lefusion.diffusion.loss import lesion_channel_masks
from nnunet_lefusion.labels import resolve_lesion_labels
from nnunet_lefusion.synthesis.lefusion import LesionSampler
from nnunet_lefusion.training.roi_data import lesion_roi
from benchmarks.lesion_quality import held_out_cases


def one_hot_condition(bin_index: int, classes: int) -> torch.Tensor:
    """Every class's histogram entirely in one bin."""
    block = torch.zeros(NUM_BINS)
    block[bin_index] = 1.0
    return block.repeat(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="sampler checkpoint")
    parser.add_argument("--raw", required=True, help="raw nnU-Net dataset folder with held-out cases")
    parser.add_argument("--cases", type=int, default=4, help="held-out lesion cases (default 4)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[299, 250, 200, 150, 100, 50])
    parser.add_argument("--weights", default="ema", choices=("ema", "model"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sampler = LesionSampler.load(args.checkpoint, "cpu", args.weights)
    if sampler.level_offset:
        raise SystemExit(f"error: {args.checkpoint} is a level-offset sampler: its lesions take their condition's "
                         "level by construction (diffusion.level_offset), which this diagnostic of the network "
                         "alone does not measure; use lesion_quality.py.")
    raw = Path(args.raw)
    labels = resolve_lesion_labels(json.loads((raw / "dataset.json").read_text()), list(sampler.labels.lesions),
                                   list(sampler.labels.organ))
    items = [lesion_roi(image, label, labels, sampler.roi_size)
             for _, image, label in held_out_cases(raw, labels.lesions, args.cases)]
    x0 = torch.from_numpy(sampler.network_axes(np.stack([i.image for i in items]))).float()
    roi_labels = torch.from_numpy(sampler.network_axes(np.stack([i.label.astype(np.int64) for i in items])))
    masks = lesion_channel_masks(roi_labels, labels.lesions).bool()
    x0 = x0[:, None].expand_as(masks).contiguous()
    classes = len(labels.lesions)
    conditions = {
        "own": torch.from_numpy(np.stack([lesion_histograms(i.image, i.label, labels.lesions) for i in items])),
        "bright": one_hot_condition(NUM_BINS - 2, classes), "dark": one_hot_condition(1, classes), "null": None}
    print(f"checkpoint {args.checkpoint} ({args.weights} weights), {len(items)} held-out lesion ROIs from {raw.name}, "
          f"histogram scale {sampler.histogram_scale:g}")
    print(f"{'t':>5s} {'|error| own':>12s} {'|error| null':>13s} {'bright - dark':>14s}")
    generator = torch.Generator().manual_seed(args.seed)

    def lesion_means(volume: torch.Tensor) -> torch.Tensor:
        """Mean over each (ROI, class) pair that has lesion voxels."""
        sums, counts = (volume * masks).sum(dim=(2, 3, 4)), masks.sum(dim=(2, 3, 4))
        return sums[counts > 0] / counts[counts > 0]

    truth = lesion_means(x0)
    with torch.inference_mode():
        for t in args.timesteps:
            steps = torch.full((len(items),), t, dtype=torch.long)
            xt = sampler.schedule.q_sample(x0, steps, torch.randn(x0.shape, generator=generator))
            means = {}
            for name, cond in conditions.items():
                cond = None if cond is None else cond * sampler.histogram_scale
                eps = lesion_denoiser(sampler.model, masks, cond, sampler.lesion_aware)(xt, steps, cond)
                means[name] = lesion_means(sampler.schedule.predict_x0_from_eps(xt, steps, eps).clamp(-1, 1))
            print(f"{t:5d} {float((means['own'] - truth).abs().mean()):12.3f} "
                  f"{float((means['null'] - truth).abs().mean()):13.3f} "
                  f"{float((means['bright'] - means['dark']).mean()):14.3f}", flush=True)


if __name__ == "__main__":
    main()
