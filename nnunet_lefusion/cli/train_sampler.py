"""``nnUNetv2_lefusion_train_sampler``: train the LeFusion lesion-texture denoiser on an nnU-Net raw dataset.

Reads ``$nnUNet_raw/DatasetXXX_*`` (dataset.json, imagesTr, labelsTr), keeps the training cases with lesions, crops
the ROI around the host organ, maps it to [-1, 1] and trains with the official lesion-focused loss. Results go to
``$nnUNet_results/DatasetXXX_Name/LeFusion__<config>/``: checkpoint_latest.pt (every --checkpoint-every steps),
checkpoint_final.pt, training_log.txt and model_config.yaml. Official recipe (GPU): --config official
--batch-size 20 --grad-accum 2 --steps 50000; a CPU run: --config small (a few thousand steps).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from nnunet_lefusion.cli.common import cli_main
from nnunet_lefusion.cli.training_args import add_optimisation_arguments, train_config_from
from nnunet_lefusion.diffusion.loss import NORMALISATIONS
from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels
from nnunet_lefusion.model.config import ModelConfig, available_configs
from nnunet_lefusion.nnunet.cache import atomic_write_text
from nnunet_lefusion.nnunet.context import case_paths, dataset_name, env_folder, parse_fold, raw_dataset_json
from nnunet_lefusion.nnunet.provenance import FOLD_HELP, raw_fold
from nnunet_lefusion.roi import OFFICIAL_CARDIAC_SIZE
from nnunet_lefusion.training.roi_data import load_roi_set
from nnunet_lefusion.training.sampler import (DEFAULT_CLUSTERS, LesionLoss, check_model_fits, initial_sampler,
                                              stored_histogram_scale, stored_level_offset, train_sampler,
                                              with_lesion_maps)


def config_name(config: str) -> str:
    """The name in the results folder: a packaged config's name, or a YAML file's stem."""
    return Path(config).stem if Path(config).suffix else config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_train_sampler", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", dest="dataset", required=True, help="dataset id or name, e.g. 990 or Dataset990_X")
    parser.add_argument("-f", dest="fold", default="all", help=FOLD_HELP)
    parser.add_argument("--config", help=f"model config: {', '.join(available_configs())} or a YAML file "
                                         "(default small; with --init, that checkpoint's)")
    parser.add_argument("--init", help="start from this sampler checkpoint's EMA weights instead of random ones, "
                                       "e.g. to fine-tune pretrained/lefusion_sampler_phantom.pt on your data (its "
                                       "model config and histogram scale are used; its cases count as seen)")
    add_optimisation_arguments(parser, steps=50000, lr=1e-4, checkpoint_every=500, item="ROIs",
                               notes={"lr": "official", "batch-size": "official 20", "grad-accum": "official 2"})
    parser.add_argument("--keep-every", type=int, default=0,
                        help="also keep checkpoint_step<k>.pt every this many steps (default 0: never)")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (CUDA, or a CPU with bf16 support such as AMX: about 1.6x faster there)")
    parser.add_argument("--lesion-labels", type=int, nargs="+", help="lesion labels, outer to inner "
                        "(default: guessed from dataset.json label names)")
    parser.add_argument("--organ-labels", type=int, nargs="+", help="labels of the organ hosting the lesions")
    parser.add_argument("--roi", type=int, nargs=3, metavar=("Z", "Y", "X"), default=list(OFFICIAL_CARDIAC_SIZE),
                        help="ROI size in voxels (default 10 72 72, official cardiac)")
    parser.add_argument("--clusters", type=int, default=DEFAULT_CLUSTERS,
                        help=f"histogram clusters stored for sampling (default {DEFAULT_CLUSTERS})")
    parser.add_argument("--histogram-scale", type=float,
                        help="multiply the histogram condition by this before the network (default 1, official, or "
                             "the --init checkpoint's; 16 makes a flat histogram all ones, on the scale of the time "
                             "embedding)")
    parser.add_argument("--cond-drop", type=float, default=0.0,
                        help="fraction of each batch trained with the null condition instead (default 0, official)")
    parser.add_argument("--mean-loss", type=float, default=0.0,
                        help="weight of the lesion-mean term added to the lesion-focused L1 (default 0, official; "
                             "it makes the network take the lesion's level from its histogram condition)")
    parser.add_argument("--lesion-maps", action="store_true",
                        help="a lesion-aware network: it also sees each lesion class's mask and its histogram's mean "
                             "level, so it follows the condition without histogram matching (with --init: that "
                             "checkpoint's network gets the extra inputs, starting from zero weights)")
    parser.add_argument("--loss-normalisation", choices=NORMALISATIONS, default="volume",
                        help="volume (official): each lesion class weighs by its voxel count; lesion: the classes "
                             "weigh alike, so a rare inner class such as no-reflow teaches the network as much as "
                             "the outer")
    parser.add_argument("--level-offset", action="store_true",
                        help="the network generates each lesion around 0 and sampling adds its histogram's mean "
                             "level, so the level follows the condition by construction (with --init: kept if that "
                             "checkpoint has it)")
    parser.add_argument("-o", "--output", help="output folder (default $nnUNet_results/<dataset>/LeFusion__<config>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def initial_settings(args: argparse.Namespace, labels: LesionLabels) -> tuple[ModelConfig, float, bool]:
    """The model config, histogram scale and level offset of the run: as given, else the --init checkpoint's, else
    small, 1 and off, with the lesion-map inputs if asked; a given config or scale that differs from the --init
    checkpoint's is refused (``initial_sampler``)."""
    given = ModelConfig.from_yaml(args.config) if args.config else None
    if not args.init:
        config = given or ModelConfig.from_yaml("small")
        scale = 1.0 if args.histogram_scale is None else args.histogram_scale
        offset = args.level_offset
    else:
        start = initial_sampler(args.init, labels, given, args.histogram_scale)
        config, scale = start.config, stored_histogram_scale(start.meta)
        offset = args.level_offset or stored_level_offset(start.meta)
    return with_lesion_maps(config) if args.lesion_maps else config, scale, offset


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    name = dataset_name(args.dataset)
    fold = parse_fold(args.fold)
    raw_folder = env_folder("nnUNet_raw") / name
    dataset_json = raw_dataset_json(raw_folder)
    labels = resolve_lesion_labels(dataset_json, args.lesion_labels, args.organ_labels)
    model_config, histogram_scale, level_offset = initial_settings(args, labels)
    run_name = config_name(args.config) if args.config else Path(args.init).stem if args.init else "small"
    out = Path(args.output) if args.output else env_folder("nnUNet_results") / name / f"LeFusion__{run_name}"
    train_config = train_config_from(args, keep_every=args.keep_every, bf16=args.bf16, progress=not args.quiet)
    LesionLoss(labels.lesions, normalisation=args.loss_normalisation, histogram_scale=histogram_scale,
               cond_drop=args.cond_drop, mean_weight=args.mean_loss)
    check_model_fits(model_config, len(labels.lesions), args.roi)
    files, record = raw_fold(name, raw_folder, dataset_json, fold)
    rois = load_roi_set(case_paths(files), labels, args.roi, progress=not args.quiet)
    print(f"fold {fold}: {len(files)} training cases, {len(rois)} with lesions; ROI {tuple(args.roi)}, "
          f"lesion labels {list(labels.lesions)}, organ {list(labels.organ)}"
          + (f"; {rois.lesion_voxels_outside} lesion voxels fall outside the ROI"
             if rois.lesion_voxels_outside else ""))
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # a resumed run is refused unless its checkpoint holds this config: the file stays valid
        atomic_write_text(out / "model_config.yaml", yaml.safe_dump(model_config.to_dict(), sort_keys=False))
    result = train_sampler(rois, model_config, labels, args.roi, out, train_config, args.clusters, args.resume,
                           histogram_scale, args.cond_drop, record, args.mean_loss, args.init, level_offset,
                           args.loss_normalisation)
    print(f"step {result.step}: {result.checkpoint}")


if __name__ == "__main__":
    main()
