"""``nnUNetv2_lefusion_convert_emidec``: the Emidec release as an nnU-Net raw dataset ``DatasetXXX_Emidec``.

SRC is the release folder (``emidec-dataset-1.0.1``: ``Case_P001/Images/Case_P001.nii.gz``,
``Case_P001/Contours/Case_P001.nii.gz``, ...). Normal and pathological cases are both taken, their files copied
unchanged (same arrays, spacing, origin and direction); dataset.json names the labels as the plugin reads them.
"""
from __future__ import annotations

import argparse
import json

from nnunet_lefusion.cli.common import add_raw_output_arguments, cli_main, raw_output_root
from nnunet_lefusion.emidec import convert_emidec


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_lefusion_convert_emidec", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SRC", help="the Emidec release folder (holds Case_N012/, Case_P001/, ...)")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset id, e.g. 115")
    add_raw_output_arguments(parser)
    args = parser.parse_args(argv)

    root = raw_output_root(args)
    folder = convert_emidec(args.source, args.dataset_id, root, args.overwrite)
    counts = json.loads((folder / "dataset.json").read_text())["lefusion_emidec"]
    print(f"wrote {folder}: {counts['pathological']} pathological and {counts['normal']} normal cases; next: "
          f"nnUNetv2_plan_and_preprocess -d {args.dataset_id} --verify_dataset_integrity")


if __name__ == "__main__":
    main()
