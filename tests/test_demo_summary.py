"""The demo's closing lines say what the user got, where, and what a 20-iteration Dice means."""
from __future__ import annotations

from pathlib import Path

from nnunet_lefusion.cli.demo import summary_lines


def test_the_demo_ends_by_naming_its_outputs_and_explaining_a_near_zero_dice(tmp_path):
    stats = {"total_loads": 40, "total_synthetic": 19}  # as nnUNetTrainerLeFusion writes lefusion_stats.json
    validation = {"mean": {"1": {"Dice": 0.004}, "2": {"Dice": 0.002}, "3": {"Dice": 0.0}}}  # nnU-Net's summary.json
    cache = tmp_path / "nnUNet_preprocessed/Dataset990_X/lefusion_cache/plans_3d_fullres/fold_0"
    text = "\n".join(summary_lines(stats, validation, 20, 0.5, tmp_path / "preview", tmp_path / "predictions",
                                   tmp_path / "model", cache))
    for path in (cache, tmp_path / "preview", tmp_path / "predictions", tmp_path / "model"):
        assert str(path) in text
    assert "19 synthetic cases of 40" in text
    assert "label 1 0.004, label 2 0.002, label 3 0.000" in text
    last = text.splitlines()[-1]
    assert "Dice near 0 is expected after 20 iterations" in last and "pipeline, not accuracy" in last
    assert "not found" in "\n".join(summary_lines(stats, validation, 20, 0.5, Path("p"), Path("q"), Path("m"), None))
