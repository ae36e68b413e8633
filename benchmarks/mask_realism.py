"""Mask realism: generated lesion masks versus held-out real phantom masks.

Held-out real cases are fresh heart-FOV phantom cases (``--heldout`` of them, from ``--seed``, never in training),
or the pathological cases of a raw dataset the generator never saw (``--heldout-dataset``, e.g. the real test split).
Each generator draws ``--per-host`` lesion maps on the organ of every held-out case (its own lesion folded away); "copy" is the
training masks themselves. For the outer lesion (MI, MVO included) it prints the two-sample KS statistic against
the held-out real masks of the lesion volume fraction of the organ, the transmurality and the number of slices,
and the mean IoU of each mask to its nearest training mask (aligned on the LV centre; a copy scores 1).
Target for the learned generator: every KS <= 0.2 and nearest IoU <= 0.7.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.mask_realism [--checkpoint RUN/checkpoint_final.pt]
--train-dataset RAW/Dataset995_X`` (the raw dataset the generator was trained on; for the shipped generator,
``nnUNetv2_lefusion_phantom -d 995 -n 60 --seed 1 --fov heart --normal-fraction 0`` makes it, see
pretrained/README.md).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nnunet_lefusion.diffusion.sampler import SamplerConfig
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import (RuleBasedMaskGenerator, aligned_lesion_voxels, fold_lesions, host_mask,
                                   ks_statistic, lesion_slice_count, lesion_volume_fraction, nearest_iou,
                                   place_lesions, transmurality)
from nnunet_lefusion.masks.learned import LearnedMaskGenerator
from nnunet_lefusion.phantom import generate_case
from nnunet_lefusion.training.roi_data import read_volume

LABELS = LesionLabels.emidec()
KS_TARGET, IOU_TARGET = 0.2, 0.7
SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "lesion_masks_phantom.pt"
MEASURES = ("volume fraction", "transmurality", "slices")


@dataclass
class MaskSet:
    """Measurements of a set of label maps with lesions (one row per map)."""

    values: dict[str, np.ndarray]
    voxels: list[np.ndarray]
    mvo: np.ndarray

    @classmethod
    def measure(cls, label_maps: list[np.ndarray], spacings: list[tuple[float, float, float]]) -> "MaskSet":
        values = {name: [] for name in MEASURES}
        for label_map, spacing in zip(label_maps, spacings):
            values["volume fraction"].append(lesion_volume_fraction(label_map, LABELS))
            values["transmurality"].append(transmurality(label_map, LABELS, spacing=spacing))
            values["slices"].append(lesion_slice_count(label_map, LABELS))
        return cls({k: np.array(v, dtype=float) for k, v in values.items()},
                   [aligned_lesion_voxels(m, LABELS) for m in label_maps],
                   np.array([(m == LABELS.lesions[-1]).any() for m in label_maps]))


def training_cases(folder: Path) -> tuple[list[np.ndarray], list[tuple[float, float, float]]]:
    """Label maps with lesions (and spacings) of a raw dataset's labelsTr."""
    maps, spacings = [], []
    for path in sorted((folder / "labelsTr").glob("*.nii.gz")):
        label_map, image = read_volume(path)
        if np.isin(label_map, LABELS.lesions).any():
            maps.append(label_map)
            spacings.append(tuple(image.GetSpacing())[::-1])
    return maps, spacings


def generate(generator, hosts: list[np.ndarray], spacings: list, seed: int) -> tuple[list[np.ndarray], float]:
    """One placed lesion per host organ, and the seconds per mask."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    if isinstance(generator, LearnedMaskGenerator):
        lesion_maps = generator.generate_many(hosts, rng, None, spacings)
    else:
        lesion_maps = [generator.generate(h, rng, None, s) for h, s in tqdm(zip(hosts, spacings), total=len(hosts),
                                                                             desc="rule-based", unit="mask")]
    seconds = (time.perf_counter() - start) / len(hosts)
    return [place_lesions(h, m, LABELS) for h, m in zip(hosts, lesion_maps)], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED),
                        help="learned generator (default: the shipped pretrained/lesion_masks_phantom.pt)")
    parser.add_argument("--train-dataset", required=True, type=Path, help="raw dataset folder it was trained on")
    parser.add_argument("--heldout", type=int, default=100, help="held-out real phantom cases (default 100)")
    parser.add_argument("--heldout-dataset", type=Path,
                        help="raw dataset folder whose pathological cases are the held-out real masks instead")
    parser.add_argument("--per-host", type=int, default=1, help="masks generated per held-out organ (default 1)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the held-out cases and the sampling")
    parser.add_argument("--steps", type=int, default=50, help="strided sampling steps (default 50)")
    parser.add_argument("--batch-size", type=int, default=10, help="masks sampled together (default 10)")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="learned lesions as the network draws them (score > 0), not calibrated to their control")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    train_maps, train_spacings = training_cases(args.train_dataset)
    if args.heldout_dataset:
        real_maps, real_spacings = training_cases(args.heldout_dataset)
    else:
        cases = [generate_case(np.random.default_rng([args.seed, 7919, i]), True, fov="heart")
                 for i in tqdm(range(args.heldout), desc="held-out phantom cases", unit="case")]
        real_maps, real_spacings = [c.label for c in cases], [c.spacing for c in cases]
    real = MaskSet.measure(real_maps, real_spacings)
    train = MaskSet.measure(train_maps, train_spacings)
    hosts = [fold_lesions(m, LABELS) for m in real_maps] * args.per_host
    spacings = list(real_spacings) * args.per_host

    learned = LearnedMaskGenerator.load(args.checkpoint, device=args.device, batch_size=args.batch_size,
                                        sampler=SamplerConfig(jump_length=1, jump_n_sample=1, strided_steps=args.steps),
                                        calibrate=not args.uncalibrated)
    generated = {}
    for name, generator in (("learned", learned), ("rule-based", RuleBasedMaskGenerator())):
        maps, seconds = generate(generator, hosts, spacings, args.seed)
        inside = sum(int(((m >= LABELS.lesions[0]) & host_mask(h, LABELS)).sum()) for m, h in zip(maps, hosts))
        total = sum(int((m >= LABELS.lesions[0]).sum()) for m in maps)
        generated[name] = (MaskSet.measure(maps, spacings), seconds, inside / total)
    generated["copy"] = (train, 0.0, 1.0)

    print(f"\n{len(train_maps)} training masks, {len(real_maps)} held-out real masks, {args.per_host} generated "
          f"mask(s) per held-out organ; sampler {args.steps} strided steps on {args.device}; "
          f"calibrated to the control: {not args.uncalibrated}")
    print("real held-out means: " + ", ".join(f"{k} {real.values[k].mean():.3f}" for k in MEASURES)
          + f", MVO in {real.mvo.mean():.0%}; nearest-IoU of held-out real masks to training masks "
            f"{np.mean([nearest_iou(v, train.voxels) for v in real.voxels]):.3f}")
    header = (f"{'generator':<11} | " + " | ".join(f"KS {k:<15}" for k in MEASURES)
              + " | nearest IoU | MVO  | inside | s/mask")
    print(header)
    print("-" * len(header))
    rows = {}
    for name, (masks, seconds, inside) in generated.items():
        ks = [ks_statistic(masks.values[k], real.values[k]) for k in MEASURES]
        iou = float(np.mean([nearest_iou(v, train.voxels) for v in masks.voxels]))
        rows[name] = (ks, iou)
        print(f"{name:<11} | " + " | ".join(f"{v:<18.3f}" for v in ks) + f" | {iou:<11.3f} | {masks.mvo.mean():<4.0%}"
              f" | {inside:<6.1%} | {seconds:.2f}")
    ks, iou = rows["learned"]
    met = all(v <= KS_TARGET for v in ks) and iou <= IOU_TARGET
    print(f"learned generator: target (every KS <= {KS_TARGET}, nearest IoU <= {IOU_TARGET}) "
          f"{'met' if met else 'NOT met'}")
    print("generated means (" + ", ".join(MEASURES) + "): " + "; ".join(
        f"{name} " + " ".join(f"{masks.values[k].mean():.3f}" for k in MEASURES)
        for name, (masks, _, _) in generated.items()))

if __name__ == "__main__":
    main()
