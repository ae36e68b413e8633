"""``nnUNetv2_lefusion_sample``: re-texture the lesions of one case with a trained LeFusion sampler.

Writes an image on the input's grid (same size, spacing, origin, direction and pixel type) whose lesion voxels
(the lesion labels of LABEL) are newly synthesized within the image's intensity range; every other voxel is
bit-identical to the input. The label map is unchanged, so LABEL stays the segmentation of the output.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_lefusion.cli.common import add_device_argument, check_device, cli_main, seed_value
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.model.checkpoint import WEIGHTS
from nnunet_lefusion.pretrained import shipped_file
from nnunet_lefusion.synthesis.lefusion import MODES, LesionSampler, resynthesize, sampler_config
from nnunet_lefusion.training.roi_data import read_volume


def read_histogram(path: str) -> list[float]:
    """Histogram condition values from a JSON list or a text file of numbers (whitespace or commas)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise LeFusionError(f"cannot read histogram file {path}: {exc.strerror or exc}.") from None
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else text.replace(",", " ").split()
        return [float(v) for v in np.ravel(values)]
    except (ValueError, TypeError):
        raise LeFusionError(f"{path} must hold a list of numbers (JSON or plain text).") from None


def write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    """Write ``array`` with ``reference``'s geometry and metadata, atomically (temporary name, then rename)."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    for key in reference.GetMetaDataKeys():
        image.SetMetaData(key, reference.GetMetaData(key))
    suffix = "".join(path.suffixes) or ".nii.gz"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise LeFusionError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        tmp.unlink(missing_ok=True)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", dest="image", required=True, help="input image (NIfTI or any ITK format)")
    parser.add_argument("-l", dest="label", required=True, help="its label map (lesion masks to re-texture)")
    parser.add_argument("-o", dest="output", required=True, help="output image file")
    parser.add_argument("--checkpoint", help="sampler checkpoint (default: the shipped "
                                             "pretrained/lefusion_sampler_phantom.pt, Emidec labels)")
    parser.add_argument("--clusters", metavar="FILE",
                        help="histogram clusters in the official format (hist_clusters/emidec_clusters.json of the "
                             "LeFusion release) instead of the checkpoint's; needed for a random or --cluster "
                             "texture with an official checkpoint, which holds none")
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="fast: 45 strided steps, resampled at low noise (128 network evaluations); official: "
                             "all 300 steps with 5/5 jumps (1,480 evaluations) (default fast)")
    parser.add_argument("--jumps", type=int, nargs=2, metavar=("LENGTH", "RESAMPLINGS"),
                        help="RePaint jump length and resamplings (official 5 5)")
    parser.add_argument("--strided-steps", type=int, help="fast mode: strided timesteps walked (default 45)")
    texture = parser.add_mutually_exclusive_group()
    texture.add_argument("--cluster", type=int, help="texture: this histogram cluster of the training data")
    texture.add_argument("--histogram", help="texture: a file with the histogram condition values")
    texture.add_argument("--own-histogram", action="store_true",
                         help="texture: the lesions' own intensity histograms (default: a random cluster)")
    parser.add_argument("--histogram-matching", action=argparse.BooleanOptionalAction,
                        help="match each lesion class's intensities to its histogram condition, or keep them as "
                             "sampled (default: match only for a sampler trained without --level-offset)")
    parser.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA or online weights (default ema)")
    parser.add_argument("--lesion-labels", type=int, nargs="+",
                        help="lesion labels of LABEL, one per sampler channel (default: the checkpoint's)")
    parser.add_argument("--organ-labels", type=int, nargs="+",
                        help="labels of the host organ (default: the checkpoint's)")
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
    add_device_argument(parser)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise LeFusionError(f"the output folder {output.parent} does not exist.")
    if output.resolve() in (Path(args.image).resolve(), Path(args.label).resolve()):
        raise LeFusionError(f"the output {output} must not be the input image or label.")
    if args.clusters and (args.own_histogram or args.histogram):
        raise LeFusionError("--clusters gives the textures of a random or --cluster draw; --histogram and "
                            "--own-histogram do not use it")
    histogram = ("case" if args.own_histogram else args.cluster if args.cluster is not None
                 else read_histogram(args.histogram) if args.histogram else "random")
    sampler_config(args.mode, tuple(args.jumps) if args.jumps else None, args.strided_steps)  # refuse before reading
    checkpoint = args.checkpoint or shipped_file("sampler")
    sampler = LesionSampler.load(checkpoint, check_device(args.device), args.weights, args.clusters)
    image, reference = read_volume(args.image)
    label, label_image = read_volume(args.label)
    if not same_grid(reference, label_image):
        raise LeFusionError(f"{args.label} is not on the grid of {args.image} "
                            f"(size, spacing, origin or direction differ).")
    labels = LesionLabels(tuple(args.lesion_labels or sampler.labels.lesions),
                          tuple(args.organ_labels or sampler.labels.organ), sampler.labels.cavity)
    out = resynthesize(image, label, sampler, args.mode, histogram, args.seed, labels=labels,
                       jumps=tuple(args.jumps) if args.jumps else None, strided_steps=args.strided_steps,
                       histogram_matching=args.histogram_matching)
    write_like(out, reference, output)
    changed = int(np.count_nonzero(out != image))
    print(f"wrote {output}: {int(np.isin(label, labels.lesions).sum())} lesion voxels re-textured "
          f"({changed} changed value)")


if __name__ == "__main__":
    main()
