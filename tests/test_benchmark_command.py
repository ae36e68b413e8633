"""``nnUNetv2_lefusion_benchmark`` end to end with the tiny preset (real nnU-Net training, prediction and
evaluation), split in two parts run side by side, one interrupted by kill -9 and completed by running its command
again; and its statistics."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import yaml

from nnunet_lefusion.benchmark.metrics import Structure, case_figures, dice, detection, hd95
from nnunet_lefusion.benchmark.plan import PRESETS, STEP_OVERHEAD, estimate_seconds
from nnunet_lefusion.benchmark.report import lesion_f1, run_times
from nnunet_lefusion.benchmark.stats import bootstrap, paired, run_level, run_level_values
from nnunet_lefusion.benchmark.step_time import step_seconds
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.precision import CPU_BF16_LOG_LINE, cpu_has_native_bf16
from tests.nnunet_helpers import BIN, run_cli


def test_dice_hd95_and_detection_on_known_masks():
    reference = np.zeros((4, 20, 20), bool)
    reference[1:3, 2:6, 2:6] = True            # lesion A
    reference[1:3, 12:16, 12:16] = True        # lesion B
    prediction = np.zeros_like(reference)
    prediction[1:3, 2:6, 3:7] = True           # A, shifted by one voxel
    prediction[1:3, 17:19, 2:4] = True         # a false positive
    assert dice(reference, prediction) == pytest.approx(2 * 24 / (64 + 40))
    assert math.isnan(dice(reference & False, prediction & False))
    assert detection(reference, prediction) == (2, 1, 1)
    assert hd95(reference, reference, (10.0, 1.5, 1.5)) == 0.0
    assert hd95(reference, prediction, (10.0, 1.5, 1.5)) > 1.5 and math.isnan(hd95(reference, prediction & False,
                                                                                  (1, 1, 1)))


def test_the_nnunet_convention_counts_a_prediction_without_reference_as_zero():
    empty, lesion = np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8)
    lesion[0, 2:4, 2:4] = 4
    structure = [Structure("no_reflow", (4,))]
    false_alarm = case_figures(empty, lesion, (10.0, 1.0, 1.0), structure, structure)
    assert false_alarm["dice_no_reflow_nnunet"] == 0.0 and math.isnan(false_alarm["dice_no_reflow"])
    assert false_alarm["dice_no_reflow_emidec"] == 0.0 and false_alarm["false_no_reflow"] == 1
    nothing = case_figures(empty, empty, (10.0, 1.0, 1.0), structure, structure)
    assert math.isnan(nothing["dice_no_reflow_nnunet"]) and nothing["dice_no_reflow_emidec"] == 1.0
    hit = case_figures(lesion, lesion, (10.0, 1.0, 1.0), structure, structure)
    assert hit["dice_no_reflow_nnunet"] == hit["dice_no_reflow"] == 1.0


def test_lesion_f1_pools_a_runs_counts():
    run = {"cases": [{"lesions_x": 2, "found_x": 1, "false_x": 0}, {"lesions_x": 0, "found_x": 0, "false_x": 2}]}
    assert lesion_f1(run, Structure("x", (4,))) == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))


def test_the_run_level_interval_on_a_table_whose_answer_is_known():
    # 5 runs whose case means are 1..5 (each run's cases vary around its mean): the mean over runs is 3 and the
    # 95 % t-interval is 3 +- t(0.975, 4) * sd / sqrt(5) = 3 +- 2.7764 * 1.5811 / 2.2361 = [1.0368, 4.9632]
    offsets = np.array([[-0.5], [0.0], [0.5]])
    values = np.arange(1.0, 6.0)[None, :] + offsets
    estimate = run_level(values)
    assert estimate.per_run == pytest.approx([1, 2, 3, 4, 5]) and estimate.runs == 5
    assert (estimate.mean, estimate.t_low, estimate.t_high) == pytest.approx((3.0, 1.0368, 4.9632), abs=1e-4)
    assert 1.0 < estimate.boot_low < 3.0 < estimate.boot_high < 5.0
    # paired: the arm beats the control by 0.1 in every run but by noise within runs -> interval above 0
    control = values / 10
    arm = control + 0.1 + np.array([[0.01], [-0.01], [0.0]])
    diff = run_level(arm, control)
    assert diff.mean == pytest.approx(0.1) and diff.t_low == pytest.approx(0.1) and diff.p < 1e-6
    # a difference that flips sign between runs: the run-level interval straddles 0 however many cases
    flips = run_level_values([0.2, -0.2, 0.2, -0.2, 0.1], np.zeros(5))
    assert flips.t_low < 0 < flips.t_high and flips.p > 0.3


def test_bootstrap_interval_contains_the_mean_and_the_paired_test_sees_a_shift():
    rng = np.random.default_rng(0)
    control = rng.uniform(0.3, 0.8, size=(30, 3))
    control[0, 1] = np.nan   # a case without the structure in one seed
    estimate = bootstrap(control)
    assert estimate.low < estimate.mean < estimate.high and estimate.n == 89
    shifted = paired(control + 0.05 + rng.normal(0, 0.01, control.shape), control)
    same = paired(control + rng.normal(0, 0.01, control.shape), control)
    assert shifted.low > 0 and shifted.p < 0.01 and same.low < 0 < same.high and same.p > 0.05


def test_run_times_leave_out_runs_without_recorded_times():
    results = [{"arm": "real", "seed": 0, "seconds": {"synthesize": None, "train": 100.0, "predict": 5.5}},
               {"arm": "copypaste", "seed": 0, "seconds": {"synthesize": 20.0, "train": 200.0, "predict": 4.0}},
               {"arm": "lefusion", "seed": 0}]  # finished before times were kept
    times = run_times(results)
    assert times["per_run"] == {"real/seed_0": 105.5, "copypaste/seed_0": 224.0, "lefusion/seed_0": None}
    assert times["timed_runs"] == 2 and times["timed_seconds"] == 329.5


def test_epochs_and_iterations_override_a_presets_schedule_and_its_estimate():
    cpu = PRESETS["cpu"]
    shorter = cpu.with_schedule(40, None)
    assert (shorter.epochs, shorter.iterations, shorter.arms, shorter.seeds) == (40, cpu.iterations, cpu.arms,
                                                                                 cpu.seeds)
    assert shorter.schedule == "40 epochs x 30 iterations = 1,200 per run" and cpu.with_schedule(None, None) is cpu
    training = [estimate_seconds(p, [("real", 0)], 40, True) - 60 for p in (cpu, shorter)]   # 60 s overhead a run
    assert training[1] == pytest.approx(0.4 * training[0])
    full = PRESETS["full"].with_schedule(None, 5)
    assert (full.epochs, full.iterations, full.short) == (1000, 5, True) and "own schedule" in PRESETS["full"].schedule
    with pytest.raises(LeFusionError):
        cpu.with_schedule(0, None)


def test_the_estimate_follows_a_training_step_measured_here(phantom_dataset, one_thread):
    step = step_seconds(DatasetContext(phantom_dataset, "2d"), "cpu", cpu_bf16=False, steps=1)
    assert 0 < step < 60
    cpu, runs = PRESETS["cpu"], [("real", 0), ("lefusion_masks", 0)]
    timed = estimate_seconds(cpu, runs, 40, True)
    as_timed = estimate_seconds(cpu, runs, 40, True, step=cpu.seconds_per_iteration / STEP_OVERHEAD)
    twice_as_slow = estimate_seconds(cpu, runs, 40, True, step=2 * cpu.seconds_per_iteration / STEP_OVERHEAD)
    overhead = 60 * len(runs)
    assert as_timed == pytest.approx(timed) and twice_as_slow - overhead == pytest.approx(2 * (timed - overhead))


@pytest.mark.slow
def test_tiny_benchmark_in_two_parts_resumes_after_kill_and_the_last_part_writes_the_summary(phantom_dataset,
                                                                                           tmp_path):
    """The three arms real, real_balanced and rebalanced copy-paste in two parts (part 0: real and copypaste, part 1:
    real_balanced, killed in its training and started again)."""
    out = tmp_path / "bench"
    cmd = [str(BIN / "nnUNetv2_lefusion_benchmark"), "-d", "990", "-c", "2d", "-o", str(out),
           "--preset", "tiny", "--arms", "real_balanced,copypaste", "--train-cases", "5", "-device", "cpu",
           "-num_parts", "2"]
    # a user's LEFUSION_* variable does not reach the runs: each run hands its trainer its own settings file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "LEFUSION_RATE": "0.9"}
    # both parts start together (they share the test set and the linked preprocessed folder); part 1 (real_balanced)
    # is killed in its training, with its nnU-Net child (the whole job, as kill -9 of a process group or a
    # scheduler does: the child alone would go on training beside the resumed run)
    second = subprocess.Popen(cmd + ["-part_id", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    first = subprocess.Popen(cmd + ["-part_id", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    other_log = out / "runs" / "real_balanced" / "seed_0" / "log.txt"
    deadline = time.time() + 900
    while not (other_log.is_file() and "=== train" in other_log.read_text()) and second.poll() is None:
        assert time.time() < deadline, "part 1 never reached its training"
        time.sleep(0.5)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    first_output = first.communicate(timeout=900)[0]
    assert first.returncode == 0 and "1 run(s) of the other parts are not" in first_output, first_output[-2000:]
    real_done = out / "runs" / "real" / "seed_0" / "metrics.json"
    assert real_done.is_file() and not (out / "runs" / "real_balanced" / "seed_0" / "metrics.json").exists()
    native_bf16 = cpu_has_native_bf16()   # the preset's cpu_bf16 applies where the CPU has bf16 in hardware
    assert (CPU_BF16_LOG_LINE in (real_done.parent / "log.txt").read_text()) is native_bf16
    assert not (out / "summary.json").exists() and len(list(out.glob("test/Dataset*/labelsTr/*"))) == 3
    finished = real_done.stat().st_mtime_ns

    done = run_cli("nnUNetv2_lefusion_benchmark", *cmd[1:], "-part_id", "1", env=env)   # completes the benchmark
    assert real_done.stat().st_mtime_ns == finished, "a finished run was redone"
    assert done.stdout.strip().splitlines()[-1].startswith("headline (nnU-Net convention")
    summary = json.loads((out / "summary.json").read_text())
    arms = ["real", "real_balanced", "copypaste"]
    assert summary["arms"] == arms and summary["seeds"] == 1 and summary["cpu_bf16"] is native_bf16
    assert summary["cpu_bf16_per_run"] == {f"{arm}/seed_0": native_bf16 for arm in arms}
    assert len(summary["test_cases"]) == 3 and len(summary["splits"][0]["train"]) == 5
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 3 * 3 and {r["arm"] for r in rows} == set(arms)
    for key, per_arm in summary["figures"].items():
        for arm, figures in per_arm.items():
            e = figures["estimate"]
            if e["mean"] is not None:
                assert e["low"] - 1e-9 <= e["mean"] <= e["high"] + 1e-9, (key, arm)
        diff = per_arm["copypaste"]["vs_real"]
        if diff["mean"] is not None:
            assert diff["low"] - 1e-9 <= diff["mean"] <= diff["high"] + 1e-9 and 0 < diff["p"] <= 1
    organ = summary["figures"]["dice_organ"]["real"]["estimate"]
    assert organ["n"] == 3 and 0 <= organ["mean"] <= 1
    assert "| real |" in (out / "table.md").read_text() and (out / "benchmark.png").stat().st_size > 10_000
    run_folder = out / "runs" / "copypaste" / "seed_0"
    assert (run_folder / "cache" / "manifest.json").is_file()
    settings = yaml.safe_load((run_folder / "lefusion.yaml").read_text())
    assert (settings["rate"], settings["mode"], settings["cache"]) == (0.5, "cache", str(run_folder / "cache"))
    (recorded,) = run_folder.glob("nnUNet_results/*/nnUNetTrainerLeFusion_short__*/fold_0/lefusion_settings.json")
    assert json.loads(recorded.read_text())["settings"] == settings
    times = summary["run_seconds"]  # each run's synthesis, training and prediction time, kept across the kill
    assert times["timed_runs"] == 3 and all(v > 0 for v in times["per_run"].values())
    assert abs(times["timed_seconds"] - sum(times["per_run"].values())) < 0.2
    assert "run time: " in done.stdout
    assert "for the 1 of 1 run(s) of part 1 of 2 not done yet" in done.stdout
    again = run_cli("nnUNetv2_lefusion_benchmark", *cmd[1:], "-part_id", "0", env=env)   # all done: nothing to run
    assert "estimated time: 0.0 h for the 0 of 2 run(s) of part 0 of 2" in again.stdout
    assert real_done.stat().st_mtime_ns == finished

    runs = {arm: json.loads((out / "runs" / arm / "seed_0" / "metrics.json").read_text()) for arm in arms}
    # the arms of a seed train on the same cases, identifier by identifier
    assert runs["real"]["training_cases"] == runs["real_balanced"]["training_cases"] == runs["copypaste"][
        "training_cases"] and len(runs["real"]["training_cases"]) == 5
    balanced_log = (out / "runs" / "real_balanced" / "seed_0" / "log.txt").read_text()
    assert "rare_focus 0.5: a real load goes with that probability to one of the" in balanced_log
    assert "rate 0, no synthetic cases" in balanced_log
    copypaste_log = (run_folder / "log.txt").read_text()
    assert "--method copypaste" in copypaste_log and "--target-share 4=0.3" in copypaste_log
    for metrics in runs.values():   # what each run ran on, and both scorings of its predictions
        environment = metrics["environment"]
        assert environment["precision"] in ("fp32", "bf16 autocast") and environment["commit"]
        assert environment["packages"]["nnunetv2"].startswith("2.8")
        assert len(metrics["cases_postprocessed"]) == len(metrics["cases"]) == 3
    assert {"run_figures", "run_figures_postprocessed", "lesion_voxels_per_load"} <= set(summary)
    assert len(summary["commits"]) == 1
    f1 = summary["run_figures"]["f1_no_reflow"]["real_balanced"]["vs_real"]
    assert f1["runs"] <= 1 and "per_run" in f1


def test_the_report_gives_run_level_figures_with_and_without_postprocessing(tmp_path):
    from nnunet_lefusion.benchmark.report import POSTPROCESSED, write_outputs

    structures = [Structure("infarct", (3,)), Structure("no_reflow", (4,))]
    results = []
    for arm, dice_nr in (("real", 0.2), ("real_balanced", 0.3)):
        for seed in range(5):
            cases = []
            for case in range(4):
                reference = np.zeros((3, 12, 12), np.uint8)
                reference[1, 2:8, 2:8] = 3
                if case < 2:   # two cases with no-reflow, two without
                    reference[1, 4:6, 4:6] = 4
                prediction = reference.copy()
                if case == 3 and arm == "real_balanced":   # a false alarm on a case without no-reflow
                    prediction[1, 9:11, 9:11] = 4
                cases.append({"case": f"c{case}", **case_figures(reference, prediction, (10.0, 1.0, 1.0),
                                                                 structures, structures)})
            results.append({"arm": arm, "seed": seed, "cases": cases, "cases_postprocessed": cases[:], "curves": {},
                            "lesion_voxels_per_load": {"4": dice_nr * 10}})
    text, runs = write_outputs(tmp_path, {}, results, ("real", "real_balanced"), 5, structures, structures, False)
    assert set(runs) == {"", POSTPROCESSED} and "after nnU-Net's postprocessing" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    nnunet = summary["run_figures"]["dice_no_reflow_nnunet"]
    # real: perfect on the two cases with no-reflow, no value on the others; real_balanced: a 0 on case 3
    assert nnunet["real"]["estimate"]["per_run"] == [1.0] * 5
    assert nnunet["real_balanced"]["estimate"]["per_run"] == pytest.approx([2 / 3] * 5)
    assert nnunet["real_balanced"]["vs_real"]["mean"] == pytest.approx(-1 / 3)
    assert summary["run_figures"]["dice_no_reflow"]["real_balanced"]["vs_real"]["mean"] == pytest.approx(0.0)
    assert summary["run_figures"]["false_all"]["real_balanced"]["vs_real"]["mean"] == pytest.approx(0.25)
    assert summary["run_figures"]["f1_no_reflow"]["real_balanced"]["estimate"]["per_run"] == pytest.approx([0.8] * 5)
    assert summary["lesion_voxels_per_load"] == {"real": {"4": 2.0}, "real_balanced": {"4": 3.0}}
