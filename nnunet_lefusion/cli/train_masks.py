"""``nnUNetv2_lefusion_train_masks``: train the lesion-mask generator on the label maps of an nnU-Net raw dataset.

Reads ``$nnUNet_raw/<dataset>/labelsTr`` (images are not needed), keeps the cases with lesions, and trains a small
conditional diffusion model of lesion masks inside the host organ (``nnunet_lefusion.masks.learned``). Writes
``checkpoint_latest.pt`` (every ``--checkpoint-every`` steps), ``checkpoint_final.pt`` and ``training_log.txt``
to the output folder; ``--resume`` continues an interrupted run exactly.
"""
from __future__ import annotations

import argparse

from nnunet_lefusion.cli.common import add_device_argument, check_device, cli_main, seed_value
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import resolve_lesion_labels
from nnunet_lefusion.model import ModelConfig
from nnunet_lefusion.masks.learned import mask_model_config, train_mask_model
from nnunet_lefusion.masks.mask_data import MaskGrid, load_mask_pairs
from nnunet_lefusion.nnunet.context import dataset_name, env_folder, parse_fold, read_json
from nnunet_lefusion.nnunet.provenance import FOLD_HELP, raw_fold
from nnunet_lefusion.training.loop import TrainConfig

OUTPUT_NAME = "lefusion_masks"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_train_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", dest="dataset", required=True, help="dataset name or id (in $nnUNet_raw)")
    parser.add_argument("-f", dest="fold", default="all", help=FOLD_HELP)
    parser.add_argument("-o", "--output", help=f"output folder (default: $nnUNet_results/<dataset>/{OUTPUT_NAME})")
    parser.add_argument("--config", help="network settings: a packaged model config name or a YAML file of "
                                         "ModelConfig keys (channels, out_channels and cond_dim are set from the "
                                         "data); default: a small CPU-trainable network")
    parser.add_argument("--steps", type=int, default=2500, help="optimisation steps (default 2500)")
    parser.add_argument("--batch-size", type=int, default=4, help="masks per step (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default 250)")
    parser.add_argument("--window", type=int, nargs=3, default=list(MaskGrid.window), metavar=("Z", "Y", "X"),
                        help="native-grid window around the host organ (default %(default)s)")
    parser.add_argument("--pool", type=int, default=MaskGrid.pool,
                        help="in-plane pooling from the window onto the network grid (default %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--seed", type=seed_value, default=0)
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
    train_config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                               checkpoint_every=args.checkpoint_every, seed=args.seed, device=check_device(args.device))
    train_config.resolved()  # refuse bad settings before reading the data
    name = dataset_name(args.dataset)
    fold = parse_fold(args.fold)
    raw = env_folder("nnUNet_raw") / name
    if not (raw / "dataset.json").is_file():
        raise LeFusionError(f"{raw} has no dataset.json; is {name} a raw nnU-Net dataset?")
    dataset_json = read_json(raw / "dataset.json")
    labels = resolve_lesion_labels(dataset_json, args.lesion_labels, args.organ_labels, args.cavity_label)
    grid = MaskGrid(tuple(args.window), args.pool)
    config = mask_model_config(len(labels.lesions), ModelConfig.from_yaml(args.config) if args.config else None)
    output = args.output or env_folder("nnUNet_results") / name / OUTPUT_NAME
    cases, record = raw_fold(name, raw, fold)
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
