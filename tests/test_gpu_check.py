"""benchmarks/gpu_check.sh: valid bash, a --dry-run that prints every step and runs none, and its report."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

from benchmarks.gpu_check_report import main as report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_parses_and_every_entry_point_it_calls_exists():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    targets = re.findall(r"cli (nnUNetv2_\w+) \\?\s*([\w.]+):(\w+)", SCRIPT.read_text())
    assert {name for name, _, _ in targets} >= {"nnUNetv2_lefusion_phantom", "nnUNetv2_plan_and_preprocess",
                                                "nnUNetv2_lefusion_train_sampler", "nnUNetv2_lefusion_synthesize",
                                                "nnUNetv2_train", "nnUNetv2_lefusion_register"}
    for _, module, function in targets:  # read, not imported: importing nnU-Net's entry points takes a minute here
        source = Path(importlib.util.find_spec(module).origin).read_text()
        assert re.search(rf"^def {function}\(", source, re.M), f"{module}:{function}"


def test_dry_run_prints_each_command_in_order_and_runs_none(tmp_path):
    work = tmp_path / "work"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--work", str(work), "--wheels", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    expected = ["pip install", "nvidia-smi", "nnUNetv2_lefusion_register", "nnUNetv2_lefusion_phantom",
                "nnUNetv2_plan_and_preprocess", "nnUNetv2_lefusion_train_sampler", "--sampling fast",
                "--sampling official", "-tr nnUNetTrainerLeFusion_short", "LEFUSION_MODE=online",
                "-tr nnUNetTrainerLeFusion_r000_short", "gpu_check_report.py"]
    positions = [next(i for i, c in enumerate(commands) if key in c) for key in expected]
    assert positions == sorted(positions)
    sampler = next(c for c in commands if "train_sampler" in c)
    assert "-device cuda" in sampler and "--bf16" in sampler
    assert sum("nnUNetv2_train " in c and "-device cuda" in c for c in commands) == 3
    assert not work.exists()
    smoke = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--device", "cpu", "--official-cases", "0"],
                           capture_output=True, text=True, timeout=60)
    assert smoke.returncode == 0 and "nvidia-smi" not in smoke.stdout and "--sampling official" not in smoke.stdout
    assert "-device cuda" not in smoke.stdout and smoke.stdout.count("-device cpu") == 5
    bad = subprocess.run(["bash", str(SCRIPT), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_the_report_ends_with_the_headline_figures(tmp_path, capsys):
    stages = {"synthesize_fast": (1000.0, 1030.0), "synthesize_official": (1030.0, 1090.0),
              "train_sampler": (900.0, 960.0), "train_cache": (1100.0, 1150.0), "train_online": (1150.0, 1200.0),
              "train_r000": (1200.0, 1250.0)}
    (tmp_path / "stage_times.tsv").write_text("".join(f"{k}\t{a}\t{b}\n" for k, (a, b) in stages.items()))
    stamp = lambda t: __import__("datetime").datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
    (tmp_path / "gpu_memory.csv").write_text(f"{stamp(1010)}, 3000\n{stamp(1120)}, 9000\n{stamp(1300)}, 20000\n")
    for run, seconds in (("cache", [9.0, 2.0, 2.2, 2.1]), ("online", [9.0, 2.4, 2.6, 2.5]), ("r000", [8, 2, 2, 2])):
        fold = tmp_path / f"results_{run}" / "Dataset997_X" / "T__nnUNetPlans__3d_fullres" / "fold_0"
        fold.mkdir(parents=True)
        (fold / "training_log_2026_1_1_00_00_00.txt").write_text("".join(f"Epoch time: {s} s\n" for s in seconds))
        (fold / "lefusion_stats.json").write_text(json.dumps({"epochs": [{"produced": 1}, {"produced": 2}]}))
    report([str(tmp_path), "--fast-cases", "16", "--official-cases", "2", "--steps", "300"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-4] == "=== gpu_check headline"
    assert lines[-3] == "synthetic cases per minute (whole command, loading included): fast 32.0, official 2.00"
    assert lines[-2] == "online-mode epoch time / _r000: 1.250; from the cache / _r000: 1.050"
    assert lines[-1] == "peak GPU memory: 9000 MiB (training 9000 MiB)"
    assert "online mode made 3 LeFusion case(s) during its training" in lines
