"""``nnUNetv2_lefusion_synthesize``: fill the synthetic cache of a dataset/configuration/fold."""
from __future__ import annotations

import argparse
from pathlib import Path

from nnunet_lefusion.cli.common import (add_device_argument, add_parts_arguments, check_device, cli_main,
                                        seed_value)
from nnunet_lefusion.config import METHODS
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import resolve_lesion_labels
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.generators import SynthesizerOptions
from nnunet_lefusion.nnunet.preview import export_nifti, write_previews
from nnunet_lefusion.nnunet.synthesize import synthesize_cache
from nnunet_lefusion.synthesis.lefusion import sampler_config
from nnunet_lefusion.synthesis.plan import SynthesisPlan


def check_flags(args: argparse.Namespace, plan: SynthesisPlan | None) -> None:
    """Refuse flags the chosen method would ignore, and a LeFusion run that misses what it needs."""
    lefusion_only = {"--checkpoint": args.checkpoint, "--clusters": args.clusters, "--sampling": args.sampling,
                     "--strided-steps": args.strided_steps,
                     "-device": args.device, "--mask-generator": args.mask_generator,
                     "--[no-]histogram-matching": args.histogram_matching}
    if args.method != "lefusion":
        given = [flag for flag, value in lefusion_only.items() if value is not None]
        if given:
            raise LeFusionError(f"{', '.join(given)} only apply to --method lefusion, not {args.method}")
    if args.method == "lefusion":
        sampler_config(args.sampling or "fast", strided_steps=args.strided_steps)  # refused before any case is read
    if args.candidates is not None and not args.target_share:
        raise LeFusionError("--candidates only applies with --target-share (it picks among proposals to meet it)")
    if args.method == "copypaste" and plan and (plan.mix or {}).get("retexture", 0) > 0:
        raise LeFusionError("--method copypaste makes newmask and normal cases, not retexture (that is lefusion's)")
    if args.method == "lefusion" and args.mask_generator and not (plan and plan.new_masks):
        raise LeFusionError("--mask-generator makes new lesion masks, which only newmask/normal cases use: add "
                            "them to --mix (e.g. --mix retexture=0.5,newmask=0.25,normal=0.25) or drop it")


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_lefusion_synthesize",
        description="Synthesize lesion cases from the training cases of one fold and store them, preprocessed by "
                    "nnU-Net's own preprocessor, in the cache that nnUNetTrainerLeFusion reads.")
    parser.add_argument("-d", dest="dataset", required=True, help="dataset name or id")
    parser.add_argument("-c", dest="configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-f", dest="fold", default="0", help="fold: 0-4 or 'all' (default 0)")
    parser.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("--method", default="copypaste", choices=METHODS, help="synthesis method")
    parser.add_argument("-n", dest="num_cases", type=int, default=0,
                        help="number of synthetic cases to add, spread evenly over the training cases; a later run "
                             "adds more, continuing over the training cases where the last one stopped. The same "
                             "command again after an interruption finishes the interrupted run instead (default 0: "
                             "only --preview / --export-raw an existing cache)")
    add_parts_arguments(parser, "this run", "the cases one run gives")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--cache", default=None, help="cache folder (default: <preprocessed dataset>/lefusion_cache/"
                                                      "<data_identifier>/fold_<f>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing cache instead of adding to it (refused while another writer runs)")
    parser.add_argument("--lesion-labels", type=int, nargs="+", default=None,
                        help="lesion labels, outer to inner (default: from dataset.json label names)")
    parser.add_argument("--organ-labels", type=int, nargs="+", default=None,
                        help="labels of the organ that hosts lesions (default: the other foreground labels)")
    parser.add_argument("--mix", default=None,
                        help="kinds of synthetic case and their shares, e.g. retexture=0.5,newmask=0.25,normal=0.25 "
                             "(retexture: real lesion masks re-textured; newmask: new lesion shapes on pathological "
                             "cases; normal: lesions on normal cases). Default: what the method makes, over all cases")
    parser.add_argument("--target-share", default=None,
                        help="wanted share of each lesion label among the synthetic lesion voxels, e.g. 4=0.2 "
                             "(raises the rare no-reflow)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="proposals drawn per case to meet --target-share (default 8)")
    parser.add_argument("--checkpoint", default=None,
                        help="LeFusion sampler checkpoint (--method lefusion; default: the shipped "
                             "pretrained/lefusion_sampler_phantom.pt where the lesion labels are Emidec's 3, 4 in "
                             "2); refused if it was trained on a validation case of this fold")
    parser.add_argument("--clusters", metavar="FILE", default=None,
                        help="LeFusion histogram clusters in the official format (hist_clusters/emidec_clusters.json "
                             "of the LeFusion release: one 16-bin histogram per lesion class) instead of the "
                             "checkpoint's; needed with an official checkpoint, which holds none")
    parser.add_argument("--sampling", default=None, choices=("fast", "official"),
                        help="LeFusion sampling schedule: fast (128 network evaluations, default) or the official "
                             "5/5 jumps")
    parser.add_argument("--strided-steps", type=int, default=None,
                        help="fast sampling: strided timesteps walked (default 45; fewer are faster and coarser)")
    parser.add_argument("--mask-generator", default=None,
                        help="new lesion masks for newmask/normal cases: 'rule' or a learned mask-generator checkpoint "
                             "(default: the shipped pretrained/lesion_masks_phantom.pt where the labels fit it); "
                             "refused if it was trained on a validation case of this fold")
    parser.add_argument("--preview", metavar="DIR",
                        help="write one picture per synthetic case of the cache: its real source and the synthetic "
                             "case at the slice with the most lesion, lesion outlines drawn")
    parser.add_argument("--preview-cases", type=int, default=None, help="at most this many pictures (default all)")
    parser.add_argument("--export-raw", metavar="DIR",
                        help="write the cache's synthetic cases as NIfTI (images and labels, nnU-Net's preprocessed "
                             "grid and spacing) for a viewer")
    add_device_argument(parser)
    parser.add_argument("--histogram-matching", action=argparse.BooleanOptionalAction,
                        help="LeFusion: match each lesion class's intensities to its histogram condition, or keep "
                             "them as sampled (default: match only for a sampler trained without --level-offset)")
    args = parser.parse_args(argv)

    plan = (SynthesisPlan.parse(args.mix, args.target_share, 8 if args.candidates is None else args.candidates)
            if args.mix or args.target_share else None)
    if args.preview_cases is not None and args.preview_cases < 1:
        raise LeFusionError(f"--preview-cases must be >= 1, got {args.preview_cases}")
    if args.num_cases == 0:
        if not (args.preview or args.export_raw):
            raise LeFusionError("nothing to do: give -n N to synthesize, or --preview/--export-raw to look at a cache")
    else:
        check_flags(args, plan)
    ctx = DatasetContext(args.dataset, args.configuration, args.fold, args.plans)
    labels = resolve_lesion_labels(ctx.dataset_json, args.lesion_labels, args.organ_labels)
    if args.num_cases == 0:
        store = CacheStore.for_context(ctx, args.cache)
        folder, manifest = store.folder, store.load()
    else:
        device = check_device(args.device) if args.method == "lefusion" else "cpu"
        folder, manifest = synthesize_cache(ctx, labels, args.method, args.num_cases, args.seed, args.cache,
                                            args.overwrite, plan, SynthesizerOptions(
                                                args.checkpoint, args.sampling or "fast", device, args.mask_generator,
                                                args.histogram_matching, args.clusters, args.strided_steps),
                                            args.num_parts, args.part_id)
    if args.preview:
        written = write_previews(ctx, folder, labels, Path(args.preview), args.preview_cases)
        print(f"{written} preview pictures in {args.preview}")
    if args.export_raw:
        print(f"{export_nifti(ctx, folder, Path(args.export_raw))} synthetic cases as NIfTI in {args.export_raw}")
    print(f"{len(manifest.cases)} synthetic cases in {folder}")
    voxels = {"real (training cases)": manifest.real_lesion_voxels, "synthetic": manifest.lesion_voxel_totals()}
    shares = {name: {k: v / (sum(counts.values()) or 1) for k, v in counts.items()} for name, counts in voxels.items()}
    for name, counts in voxels.items():
        print(f"lesion voxels, {name}: " + ", ".join(
            f"label {k}: {v} ({shares[name][k]:.1%})" for k, v in sorted(counts.items())))
    for label, share in (plan.target_share.items() if plan is not None else ()):
        reached = shares["synthetic"].get(str(label), 0.0)
        if reached < 0.9 * share:
            print(f"note: label {label} is {reached:.1%} of the synthetic lesion voxels, short of its target share "
                  f"{share:.0%}: the new lesions drawn hold too little of it (more --candidates, or a mask generator "
                  f"that draws larger label-{label} parts, get closer)")
