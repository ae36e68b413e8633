"""How real do re-synthesized lesions look? Intensity distributions of real vs synthetic lesions, fast vs full schedule.

Run: ``PYTHONPATH=. .venv/bin/python -m benchmarks.lesion_quality --checkpoint CKPT --raw RAW_DATASET_FOLDER
[--cases 8] [--full-schedule 5/5] [--histogram case|random] [--batch 4] [--device cpu]``.

The lesions of held-out cases (not seen in training) are re-textured on their real masks with the checkpoint's
sampler, once in the fast mode and once on the full 300-step schedule with the RePaint jumps of
``--full-schedule`` (official 5/5; 2/2 bounds CPU time); each sample is shown as the network made it and
histogram-matched to its condition (the default output of the product). Per lesion class it prints the
1-Wasserstein distance between the real and the synthetic lesion intensities of each case (native units, mean
over cases, and relative to the real lesion's standard deviation). For scale, two reference rows: a lesion whose
voxels are the case's own healthy myocardium (wrong tissue), and the distance between the two halves of the real
lesion (sampling noise). With ``--histogram case`` the matched rows reach the real distribution by construction;
their spatial texture is the network's, so a second table compares the roughness (mean absolute difference of
in-plane neighbours inside the lesion) of synthetic and real lesions. The background check is the largest
absolute change outside the lesions (must be 0).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from nnunet_lefusion.nnunet.context import training_cases
from nnunet_lefusion.labels import resolve_lesion_labels
from nnunet_lefusion.synthesis.lefusion import LesionSampler, sampler_config
from nnunet_lefusion.training.roi_data import read_volume


def parse_jumps(text: str) -> tuple[int, int]:
    """'5/5' -> (5, 5): RePaint jump length / resamplings."""
    try:
        length, resamplings = (int(v) for v in text.split("/"))
        return length, resamplings
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LENGTH/RESAMPLINGS such as 5/5, got {text!r}") from None


def held_out_cases(raw: Path, lesions: tuple[int, ...], limit: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Up to ``limit`` (identifier, image, label) cases of a raw dataset that have lesion voxels."""
    cases = []
    for identifier, image_file, label_file in training_cases(raw):
        label, _ = read_volume(label_file)
        if np.isin(label, lesions).any():
            cases.append((identifier, read_volume(image_file)[0], label))
        if len(cases) == limit:
            break
    return cases


def split_half_distance(values: np.ndarray, rng: np.random.Generator) -> float:
    """W1 between two random halves of a sample: what chance alone gives at this sample size."""
    order = rng.permutation(values.size)
    half = values.size // 2
    return wasserstein_distance(values[order[:half]], values[order[half:]]) if half else float("nan")


def per_case(label_maps: list[np.ndarray], labels, measure) -> dict[int, list[float]]:
    """Per lesion label, ``measure(case index, label map, label)`` of every case that has the label."""
    return {lab: [measure(k, m, lab) for k, m in enumerate(label_maps) if (m == lab).any()] for lab in labels.lesions}


def lesion_roughness(volume: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference of in-plane neighbours (Y and X) that both lie in ``mask``."""
    volume = volume.astype(np.float64)
    differences = [np.abs(np.diff(volume, axis=axis))[mask[(slice(None),) * axis + (slice(1, None),)]
                                                      & mask[(slice(None),) * axis + (slice(None, -1),)]]
                   for axis in (1, 2)]
    values = np.concatenate(differences)
    return float(values.mean()) if values.size else float("nan")


def relative_mean(values: list[float], scale: list[float]) -> float:
    """Mean over cases of value / scale."""
    return float(np.mean(np.asarray(values) / np.maximum(np.asarray(scale), 1e-9)))


def print_table(rows: dict[str, dict[int, list[float]]], lesions, scale: dict[int, list[float]]) -> None:
    """One row per entry: per lesion label the mean over cases, and the mean of each case's value / its scale."""
    print(f"{'':44s}" + "".join(f"{'label ' + str(lab) + ' (n=' + str(len(scale[lab])) + ')':>28s}" for lab in lesions))
    for name, per_label in rows.items():
        cells = []
        for lab in lesions:
            values = per_label[lab]
            cells.append(f"{np.mean(values):12.1f} | {relative_mean(values, scale[lab]):6.2f}" if values
                         else f"{'-':>21s}")
        print(f"{name:44s}" + "".join(f"{c:>28s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="sampler checkpoint (e.g. a small model's checkpoint_final.pt)")
    parser.add_argument("--raw", required=True, help="raw nnU-Net dataset folder with held-out cases")
    parser.add_argument("--cases", type=int, default=8, help="held-out lesion cases to use (default 8)")
    parser.add_argument("--full-schedule", type=parse_jumps, default=(5, 5),
                        help="RePaint jumps of the full 300-step schedule, LENGTH/RESAMPLINGS (default 5/5, official)")
    parser.add_argument("--histogram", default="case", choices=("case", "random"),
                        help="texture condition: the lesion's own histogram or a random training cluster "
                             "(default case)")
    parser.add_argument("--batch", type=int, default=4, help="ROIs per sampler call (default 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="ema", choices=("ema", "model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true", help="only the fast mode")
    parser.add_argument("--precision", nargs="+", default=[None], choices=("fp32", "bf16"),
                        help="network precision(s) to compare (default: bf16 where the device runs it natively)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[None],
                        help="classifier-free guidance scale(s) to compare (default: the checkpoint's)")
    args = parser.parse_args()

    sampler = LesionSampler.load(args.checkpoint, args.device, args.weights)
    raw = Path(args.raw)
    labels = resolve_lesion_labels(json.loads((raw / "dataset.json").read_text()), list(sampler.labels.lesions),
                                   list(sampler.labels.organ))
    cases = held_out_cases(raw, labels.lesions, args.cases)
    images = [c[1] for c in cases]
    label_maps = [m for _, _, m in cases]   # every lesion voxel is re-synthesized (several windows if needed)
    jl, jn = args.full_schedule
    modes = {}
    for w in args.guidance:
        for precision in args.precision:
            suffix = (f" w={w:g}" if w is not None else "") + (f" {precision}" if len(args.precision) > 1 else "")
            modes["fast" + suffix] = sampler_config("fast", guidance=w, precision=precision)
            if not args.skip_full:
                modes[f"full {jl}/{jn}" + suffix] = sampler_config("official", (jl, jn), guidance=w,
                                                                   precision=precision)
    print(f"checkpoint {args.checkpoint} ({args.weights} weights), {len(cases)} held-out cases from {raw.name}, "
          f"histogram condition: {args.histogram}, torch threads {torch.get_num_threads()}")

    rng = np.random.default_rng(args.seed)
    stds = per_case(label_maps, labels, lambda k, m, lab: float(images[k][m == lab].std()))
    real_roughness = per_case(label_maps, labels, lambda k, m, lab: lesion_roughness(images[k], m == lab))
    distance: dict[str, dict[int, list[float]]] = {}
    roughness = {"real lesions": real_roughness}
    for name, config in modes.items():
        start = time.perf_counter()
        pairs = sampler.resynthesize_pairs(images, [c[2] for c in cases], np.random.default_rng(args.seed), config,
                                           args.histogram, labels, args.batch)
        seconds = time.perf_counter() - start
        background = max(float(np.abs(o.astype(np.float64) - i)[~np.isin(m, labels.lesions)].max())
                         for pair, i, (_, _, m) in zip(pairs, images, cases) for o in pair)
        evaluations = config.evaluations(sampler.schedule.num_steps)
        print(f"{name}: {evaluations} network evaluations per batch, {seconds / len(cases):.1f} s per ROI, "
              f"background max |difference| = {background:g}")
        for variant, index in ((name, 0), (f"{name} + histogram matching", 1)):
            out = [pair[index] for pair in pairs]
            distance[variant] = per_case(label_maps, labels, lambda k, m, lab, out=out: wasserstein_distance(
                images[k][m == lab], out[k][m == lab]))
            roughness[variant] = per_case(label_maps, labels,
                                          lambda k, m, lab, out=out: lesion_roughness(out[k], m == lab))
    distance["ref: healthy myocardium as lesion"] = per_case(label_maps, labels, lambda k, m, lab: wasserstein_distance(
        images[k][m == lab], images[k][np.isin(m, labels.organ)]))
    distance["ref: real lesion split in halves"] = per_case(label_maps, labels, lambda k, m, lab: split_half_distance(
        images[k][m == lab].astype(np.float64), rng))

    print("\n1-Wasserstein distance to the real lesion intensities, mean over cases "
          "(native units | relative to the real lesion's s.d.)")
    print_table(distance, labels.lesions, stds)
    print("\nTexture: mean |difference of in-plane neighbours| inside the lesion, mean over cases "
          "(native units | relative to the real lesion's)")
    print_table(roughness, labels.lesions, real_roughness)
    first = next(iter(modes))
    print(f"headline: {first} as sampled: " + "; ".join(
        f"label {lab} W1 {relative_mean(distance[first][lab], stds[lab]):.2f} lesion s.d., roughness "
        f"{relative_mean(roughness[first][lab], real_roughness[lab]):.2f}x real"
        for lab in labels.lesions if distance[first][lab]))


if __name__ == "__main__":
    main()
