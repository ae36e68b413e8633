"""``nnUNetv2_lefusion_phantom``: write a synthetic Emidec-like DE-MRI dataset in nnU-Net raw format.

Cases ``Case_P001``... carry an infarct (some with no-reflow), ``Case_N001``... are normal; labels 0 background,
1 LV cavity, 2 myocardium, 3 infarct, 4 no-reflow. The same seed always gives the same dataset.
"""
from __future__ import annotations

import argparse

from nnunet_lefusion.cli.common import add_raw_output_arguments, cli_main, raw_output_root, seed_value
from nnunet_lefusion.phantom import DEFAULT_NAME, FOVS, write_dataset


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset id, e.g. 990")
    parser.add_argument("-n", dest="num_cases", type=int, default=100, help="number of cases (default 100)")
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default 0)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"dataset name (default {DEFAULT_NAME})")
    parser.add_argument("--fov", choices=FOVS, default="thorax",
                        help="thorax: Emidec-like field of view (140-260 voxels); heart: a 64-80 voxel crop "
                             "around the heart, fast to train (default thorax)")
    parser.add_argument("--normal-fraction", type=float, default=1 / 3,
                        help="fraction of normal cases without lesion (default 1/3, as in Emidec)")
    add_raw_output_arguments(parser)
    args = parser.parse_args(argv)

    root = raw_output_root(args)
    folder = write_dataset(args.dataset_id, args.num_cases, args.seed, root, name=args.name, fov=args.fov,
                           normal_fraction=args.normal_fraction, overwrite=args.overwrite)
    print(f"wrote {args.num_cases} cases to {folder}")
