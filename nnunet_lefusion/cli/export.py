"""``nnUNetv2_lefusion_export``: a training checkpoint's EMA weights alone, in float16, to ship or share.

Works for LeFusion samplers and lesion-mask generators alike. The result is still in the official layout (the
official code loads it; its weights are cast back to float32 on load) and keeps our metadata, so
``nnUNetv2_lefusion_sample`` / ``nnUNetv2_lefusion_synthesize`` take it like the training checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnunet_lefusion.cli.common import cli_main
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model import export_checkpoint

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="training checkpoint (checkpoint_final.pt or checkpoint_latest.pt)")
    parser.add_argument("output", help="file to write (e.g. pretrained/lefusion_small_phantom.pt)")
    parser.add_argument("--weights", default="ema", choices=("ema", "model"), help="which weights (default ema)")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="storage type (default fp16)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="samplers: the classifier-free guidance scale sampling uses by default (measured with "
                             "benchmarks/lesion_quality.py --guidance; needs training with --cond-drop)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.is_dir() or output.parent.exists() and not output.parent.is_dir():
        raise LeFusionError(f"the output {output} must be a file name in a folder.")
    if output.exists() and not args.overwrite:
        raise LeFusionError(f"{output} exists; pass --overwrite to replace it.")
    if output.resolve() == Path(args.checkpoint).resolve():
        raise LeFusionError("the output must not be the checkpoint it is exported from.")
    if args.guidance is not None and not 0.0 <= args.guidance <= 20.0:
        raise LeFusionError(f"--guidance must be in [0, 20], got {args.guidance}")
    extras = {} if args.guidance is None else {"guidance": args.guidance}
    exported = export_checkpoint(args.checkpoint, output, args.weights, DTYPES[args.dtype], extras)
    size = output.stat().st_size / 2 ** 20
    print(f"{output}: {args.weights} weights of step {exported.step} in {args.dtype}, {size:.1f} MiB")


if __name__ == "__main__":
    main()
