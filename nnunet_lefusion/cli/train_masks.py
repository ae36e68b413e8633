"""``nnUNetv2_lefusion_train_masks``: train the lesion-mask generator on the label maps of an nnU-Net raw dataset.

Reads ``$nnUNet_raw/<dataset>/labelsTr`` (images are not needed), keeps the cases with lesions, and trains a small
conditional diffusion model of lesion masks inside the host organ (``nnunet_lefusion.masks.learned``). Writes
``checkpoint_latest.pt`` (every ``--checkpoint-every`` steps), ``checkpoint_final.pt`` and ``training_log.txt``
to the output folder; ``--resume`` continues an interrupted run exactly.
"""
from __future__ import annotations

import argparse

from nnunet_lefusion.cli.common import cli_main
from nnunet_lefusion.cli.training_args import add_optimisation_arguments, train_config_from
from nnunet_lefusion.labels import resolve_lesion_labels
from nnunet_lefusion.model import ModelConfig
from nnunet_lefusion.masks.learned import mask_model_config, train_mask_model
from nnunet_lefusion.masks.mask_data import MaskGrid, load_mask_pairs
from nnunet_lefusion.nnunet.context import dataset_name, env_folder, parse_fold, raw_dataset_json
from nnunet_lefusion.nnunet.provenance import FOLD_HELP, raw_fold

OUTPUT_NAME = "lefusion_masks"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_train_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", dest="dataset", required=True, help="dataset name or id (in $nnUNet_raw)")
    parser.add_argument("-f", dest="fold", default="all", help=FOLD_HELP)
    parser.add_argument("-o", "--output", help=f"output folder (default: $nnUNet_results/<dataset>/{OUTPUT_NAME})")
    parser.add_argument("--config", help="network settings: a packaged model config name or a YAML file of "
                                         "ModelConfig keys (channels, out_channels and cond_dim are set from the "
                                         "data); default: a small CPU-trainable network")
    add_optimisation_arguments(parser, steps=2500, lr=1e-3, checkpoint_every=250, item="masks")
    parser.add_argument("--window", type=int, nargs=3, default=list(MaskGrid.window), metavar=("Z", "Y", "X"),
                        help="native-grid window around the host organ (default %(default)s)")
    parser.add_argument("--pool", type=int, default=MaskGrid.pool,
                        help="in-plane pooling from the window onto the network grid (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    parser.add_argument("--lesion-labels", type=int, nargs="+", default=None,
                        help="lesion labels, outer to inner (default: from dataset.json label names)")
    parser.add_argument("--organ-labels", type=int, nargs="+", default=None,
                        help="labels of the organ that hosts lesions (default: the other foreground labels)")
    parser.add_argument("--cavity-label", type=int, default=None,
                        help="label of the cavity inside the organ (default: from dataset.json label names)")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    train_config = train_config_from(args)
    name = dataset_name(args.dataset)
    fold = parse_fold(args.fold)
    raw = env_folder("nnUNet_raw") / name
    dataset_json = raw_dataset_json(raw)
    labels = resolve_lesion_labels(dataset_json, args.lesion_labels, args.organ_labels, args.cavity_label)
    grid = MaskGrid(tuple(args.window), args.pool)
    config = mask_model_config(len(labels.lesions), ModelConfig.from_yaml(args.config) if args.config else None)
    output = args.output or env_folder("nnUNet_results") / name / OUTPUT_NAME
    cases, record = raw_fold(name, raw, dataset_json, fold)
    pairs = load_mask_pairs(((k, v["label"]) for k, v in sorted(cases.items())), labels, grid)
    print(f"fold {fold}: {len(pairs)} lesion cases of {len(cases)} training cases; lesions {list(labels.lesions)} "
          f"in organ {list(labels.organ)}; "
          f"network grid {grid.size}")
    if pairs.lesion_voxels_outside:
        print(f"warning: {pairs.lesion_voxels_outside} lesion voxels lie outside the {grid.window} window and are "
              f"not learned; enlarge --window")
    result = train_mask_model(pairs, config, labels, grid, output, train_config, resume=args.resume,
                              training_data=record)
    print(f"trained to step {result.step} ({result.steps_per_second:.3f} steps/s); generator: {result.checkpoint}")


if __name__ == "__main__":
    main()
