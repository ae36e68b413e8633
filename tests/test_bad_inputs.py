"""Bad input is one line: every command (and nnUNetv2_train with the LeFusion trainer), given a bad input, exits
non-zero with exactly one ``error:`` line on stderr, no traceback, and leaves no new or changed file behind.
Real commands on real files (Dataset990 of the session, caches made for it, the shipped mask generator): each
command's first case, nnUNetv2_train and every case that changes nnU-Net's folder variables as processes, the others
through the same entry point in-process; bad training settings also through the trainer's first step; plus the
uninstalled-package trainer stub and a real nnU-Net training resumed with --c."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from nnunet_lefusion.errors import LeFusionExit
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.register import STUB_NAME, STUB_SOURCE
from tests.nnunet_helpers import error_lines, run_cli

SHIPPED_MASKS = Path(__file__).resolve().parents[1] / "pretrained" / "lesion_masks_phantom.pt"
SHIPPED_SAMPLER = SHIPPED_MASKS.with_name("lefusion_sampler_phantom.pt")
LEFUSION_VARS = ("LEFUSION_CONFIG", "LEFUSION_RATE", "LEFUSION_MODE", "LEFUSION_CACHE", "LEFUSION_EPOCHS",
                 "LEFUSION_ITERS", "LEFUSION_VAL_ITERS", "LEFUSION_METHOD", "LEFUSION_CHECKPOINT",
                 "LEFUSION_TARGET_SHARE", "LEFUSION_DEVICE")
SYNTH = ["nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "1",
         "--cache", "{base}/new_cache"]
LEF = ["--method", "lefusion", "--checkpoint", "{masks}"]  # the checks below fire before the file is read
TRAIN = ["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "nnUNetTrainerLeFusion", "-device", "cpu"]
SAMPLER = ["nnUNetv2_lefusion_train_sampler", "-d", "990", "-f", "0", "--config", "tiny", "--roi", "2", "32", "32",
           "--steps", "1", "--quiet", "-o", "{base}/sampler"]
MASKS = ["nnUNetv2_lefusion_train_masks", "-d", "990", "-f", "0", "--steps", "1", "-o", "{base}/masks_out"]
SAMPLE = ["nnUNetv2_lefusion_sample", "-i", "{image}", "-l", "{label}", "-o", "{base}/out.nii.gz"]
BENCH = ["nnUNetv2_lefusion_benchmark", "-d", "990", "-o", "{base}/bench", "--preset", "tiny", "-device", "cpu"]
DEMO = ["nnUNetv2_lefusion_demo", "--work-dir", "{base}/demo", "-device", "cpu"]
SMALL = {"nnUNet_raw": "{base}/small_raw", "nnUNet_preprocessed": "{base}/small_pre"}  # 3 cases, raw only
RATE = {"LEFUSION_RATE": "0.5"}
ONLINE = {**RATE, "LEFUSION_MODE": "online", "LEFUSION_CACHE": "{base}/online_cache"}  # checked before training

# (id, command, environment, unset variables, a fragment the error line must hold)
CASES = [
    ("phantom-no-nnUNet_raw", ["nnUNetv2_lefusion_phantom", "-d", "993", "-n", "2"], {}, ["nnUNet_raw"],
     "nnUNet_raw"),
    ("phantom-id-taken", ["nnUNetv2_lefusion_phantom", "-d", "990", "-n", "2"], {}, [], "already used"),
    ("phantom-normal-fraction", ["nnUNetv2_lefusion_phantom", "-d", "993", "-o", "{base}/ph", "--normal-fraction",
                                 "1.5"], {}, [], "normal fraction"),
    ("phantom-one-case", ["nnUNetv2_lefusion_phantom", "-d", "993", "-n", "1", "-o", "{base}/ph"], {}, [],
     "at least 2"),
    ("register-ext-dir-is-file", ["nnUNetv2_lefusion_register", "--ext-dir", "{notes}"], {}, [], "cannot write"),
    ("unregister-ext-dir-is-file", ["nnUNetv2_lefusion_register", "--remove", "--ext-dir", "{notes}"], {}, [],
     "cannot remove"),
    ("synth-negative-fold", SYNTH[:6] + ["-1"] + SYNTH[7:], {}, [], "fold must be an integer >= 0"),
    ("synth-negative-seed", SYNTH + ["--seed", "-1"], {}, [], "--seed: must be an integer >= 0"),
    ("synth-mix-not-a-number", SYNTH + ["--mix", "normal=nan"], {}, [], "--mix takes"),
    ("synth-cache-is-a-file", SYNTH[:-1] + ["{notes}"], {}, [], "not a LeFusion cache"),
    ("synth-preview-cases-zero", SYNTH[:7] + ["--cache", "{c3d}", "--preview", "{base}/pv", "--preview-cases", "0"],
     {}, [], "--preview-cases"),
    ("synth-checkpoint-copypaste", SYNTH + ["--checkpoint", "{masks}"], {}, [], "--checkpoint only apply"),
    ("synth-sampling-copypaste", SYNTH + ["--sampling", "official"], {}, [], "--sampling only apply"),
    ("synth-strided-steps-zero", SYNTH + LEF + ["--strided-steps", "0"], {}, [], "strided steps must be >= 1"),
    ("synth-device-copypaste", SYNTH + ["-device", "cpu"], {}, [], "-device only apply"),
    ("synth-mask-generator-copypaste", SYNTH + ["--mask-generator", "rule"], {}, [], "--mask-generator only"),
    ("synth-histogram-matching-copypaste", SYNTH + ["--no-histogram-matching"], {}, [],
     "--[no-]histogram-matching only"),
    ("synth-retexture-copypaste", SYNTH + ["--mix", "retexture=1"], {}, [], "not retexture"),
    ("synth-candidates-without-target", SYNTH + ["--candidates", "4"], {}, [], "--candidates"),
    ("synth-lefusion-labels-unlike-shipped", SYNTH + ["--method", "lefusion", "--lesion-labels", "3"], {}, [],
     "no --checkpoint given, and the shipped sampler knows"),
    ("synth-lefusion-missing-checkpoint", SYNTH + ["--method", "lefusion", "--checkpoint", "{base}/none.pt"], {},
     [], "does not exist"),
    ("synth-lefusion-mask-generator-as-sampler", SYNTH + LEF, {}, [], "not a LeFusion sampler"),
    ("synth-mask-generator-of-other-labels", SYNTH + ["--method", "lefusion", "--checkpoint", "{sampler}",
                                                       "--mask-generator", "{masks}", "--mix", "normal=1",
                                                       "--lesion-labels", "4", "3"], {}, [],
     "draws lesion labels [3, 4] (outer to inner) in organ [2], not [4, 3] in [2]"),
    ("synth-lefusion-unreadable-checkpoint", SYNTH + ["--method", "lefusion", "--checkpoint", "{notes}"], {}, [],
     "not a readable PyTorch checkpoint"),
    ("synth-mask-generator-without-new-masks", SYNTH + LEF + ["--mask-generator", "rule"], {}, [],
     "newmask/normal"),
    ("synth-new-masks-labels-unlike-shipped", SYNTH + LEF + ["--mix", "retexture=0.5,newmask=0.5", "--lesion-labels",
                                                             "3"], {}, [], "no --mask-generator given"),
    ("synth-unknown-configuration", SYNTH + ["-c", "3d_lowres"], {}, [], "3d_lowres"),
    ("synth-unknown-dataset", ["nnUNetv2_lefusion_synthesize", "-d", "994", "-n", "1"], {}, [], "994"),
    ("synth-no-nnUNet_preprocessed", SYNTH, {}, ["nnUNet_preprocessed"], "nnUNet_preprocessed"),
    ("synth-zero-cases", SYNTH[:-4] + ["-n", "0", "--cache", "{base}/new_cache"], {}, [], "nothing to do"),
    ("synth-negative-cases", SYNTH[:-4] + ["-n", "-2", "--cache", "{base}/new_cache"], {}, [], ">= 1"),
    ("synth-preview-without-cache", SYNTH[:-4] + ["--cache", "{base}/new_cache", "--preview", "{base}/pictures"],
     {}, [], "no synthetic cache"),
    ("synth-bad-device", SYNTH + LEF + ["-device", "banana"], {}, [], "banana"),
    ("train_sampler-zero-steps", SAMPLER + ["--steps", "0"], {}, [], "steps"),
    ("train_sampler-bad-device", SAMPLER + ["-device", "banana"], {}, [], "banana"),
    ("train_sampler-bad-fold", SAMPLER + ["-f", "x"], {}, [], "fold"),
    ("train_sampler-negative-mean-loss", SAMPLER + ["--mean-loss", "-1"], {}, [], "mean_weight >= 0"),
    ("train_sampler-no-nnUNet_raw", SAMPLER, {}, ["nnUNet_raw"], "nnUNet_raw"),
    ("train_sampler-config-not-text", SAMPLER + ["--config", "{masks}"], {}, [], "not a text"),
    ("train_sampler-dataset-json-broken", SAMPLER[:2] + ["997"] + SAMPLER[3:], {"nnUNet_raw": "{base}/broken_raw"},
     [], "not valid JSON"),
    ("train_sampler-too-few-cases", ["nnUNetv2_lefusion_train_sampler", "-d", "995", "-f", "0", "-o",
                                     "{base}/sampler"], SMALL, [], "5-fold"),
    ("train_masks-zero-batch", MASKS + ["--batch-size", "0"], {}, [], "batch_size"),
    ("train_masks-bad-device", MASKS + ["--device", "banana"], {}, [], "banana"),
    ("train_masks-too-few-cases", ["nnUNetv2_lefusion_train_masks", "-d", "995", "-f", "0", "-o",
                                   "{base}/masks_out"], SMALL, [], "5-fold"),
    ("convert-emidec-not-a-folder", ["nnUNetv2_lefusion_convert_emidec", "{base}/no_release", "-d", "115"], {}, [],
     "is not a folder"),
    ("convert-emidec-no-case", ["nnUNetv2_lefusion_convert_emidec", "{base}", "-d", "115"], {}, [], "holds no case"),
    ("sample-missing-checkpoint", SAMPLE + ["--checkpoint", "{base}/none.pt"], {}, [], "does not exist"),
    ("sample-mask-generator-as-sampler", SAMPLE + ["--checkpoint", "{masks}"], {}, [], "not a LeFusion sampler"),
    ("sample-strided-steps-official", SAMPLE + ["--checkpoint", "{masks}", "--mode", "official",
                                                "--strided-steps", "10"], {}, [], "strided steps"),
    ("sample-output-folder-missing", SAMPLE[:-1] + ["{base}/no/out.nii.gz", "--checkpoint", "{masks}"], {}, [],
     "does not exist"),
    ("sample-output-is-input", SAMPLE[:-1] + ["{image}", "--checkpoint", "{masks}"], {}, [], "must not be"),
    ("export-missing-checkpoint", ["nnUNetv2_lefusion_export", "{base}/none.pt", "{base}/e.pt"], {}, [],
     "does not exist"),
    ("export-not-a-checkpoint", ["nnUNetv2_lefusion_export", "{notes}", "{base}/e.pt"], {}, [], "readable"),
    ("export-output-exists", ["nnUNetv2_lefusion_export", "{masks}", "{notes}"], {}, [], "--overwrite"),
    ("export-onto-itself", ["nnUNetv2_lefusion_export", "{notes}", "{notes}", "--overwrite"], {}, [],
     "must not be the checkpoint"),
    ("export-guidance-out-of-range", ["nnUNetv2_lefusion_export", "{masks}", "{base}/e.pt", "--guidance", "-1"], {},
     [], "--guidance must be in [0, 20]"),
    ("export-output-is-folder", ["nnUNetv2_lefusion_export", "{masks}", "{base}", "--overwrite"], {}, [],
     "file name"),
    ("demo-too-few-cases", DEMO + ["-n", "3"], {}, [], "5-fold"),
    ("demo-rate", DEMO + ["--rate", "2"], {}, [], "--rate"),
    ("demo-no-synthetic-cases", DEMO + ["--synthetic", "0"], {}, [], "--synthetic >= 1"),
    ("demo-device-index", DEMO[:-2] + ["-device", "cuda:1"], {}, [], "CUDA_VISIBLE_DEVICES"),
    ("demo-work-dir-is-file", ["nnUNetv2_lefusion_demo", "--work-dir", "{notes}", "-device", "cpu"], {}, [],
     "not a folder"),
    ("benchmark-zero-seeds", BENCH + ["--seeds", "0"], {}, [], "--seeds"),
    ("benchmark-zero-epochs", BENCH + ["--epochs", "0"], {}, [], "--epochs"),
    ("benchmark-unknown-arm", BENCH + ["--arms", "gan"], {}, [], "gan"),
    ("benchmark-sampler-without-lefusion-arm", BENCH + ["--arms", "copypaste", "--sampler", "{masks}"], {}, [],
     "--sampler is used by the lefusion arms"),
    ("benchmark-lefusion-missing-sampler", BENCH + ["--arms", "lefusion", "--sampler", "{base}/none.pt"], {}, [],
     "not found"),
    ("benchmark-mask-generator-as-sampler", BENCH + ["--arms", "lefusion", "--sampler", "{masks}"], {}, [],
     "not a LeFusion sampler"),
    ("benchmark-cv-six-seeds", BENCH + ["--cv", "--seeds", "6"], {}, [], "5 folds"),
    ("benchmark-other-schedule", BENCH[:4] + ["{base}/bench_other"] + BENCH[5:], {}, [], "another output folder"),
    ("benchmark-test-is-training", BENCH + ["--test-dataset", "990"], {}, [], "must not be the training"),
    ("benchmark-no-nnUNet_results", BENCH, {}, ["nnUNet_results"], "nnUNet_results"),
    ("benchmark-device-index", BENCH[:-2] + ["-device", "cuda:1"], {}, [], "CUDA_VISIBLE_DEVICES"),
    ("benchmark-part-beyond-parts", BENCH + ["-num_parts", "2", "-part_id", "2"], {}, [], "-part_id < -num_parts"),
    # nnUNetv2_train: one case per stage of the trainer's check (settings file, cache, online generator, short-run
    # variant, nnU-Net's variables); the other bad settings are checked in-process below, by the same first step
    ("train-cache-of-another-fold", TRAIN[:3] + ["1"] + TRAIN[4:], {**RATE, "LEFUSION_CACHE": "{c3d}"}, [],
     "fold 0, not fold 1"),
    ("train-settings-not-yaml", TRAIN, {"LEFUSION_CONFIG": "{base}/broken.yaml"}, [], "cannot read"),
    ("train-online-mask-generator-as-sampler", TRAIN,
     {**ONLINE, "LEFUSION_METHOD": "lefusion", "LEFUSION_CHECKPOINT": "{masks}"}, [], "not a LeFusion sampler"),
    ("train-short-epochs-not-a-number", TRAIN[:5] + ["nnUNetTrainerLeFusion_short"] + TRAIN[6:],
     {"LEFUSION_EPOCHS": "two"}, [], "LEFUSION_EPOCHS"),
    ("train-no-nnUNet_results", TRAIN, RATE, ["nnUNet_results"], "nnUNet_results"),
    ("train-no-nnUNet_raw", TRAIN, {**RATE, "LEFUSION_CACHE": "{c3d}"}, ["nnUNet_raw"], "nnUNet_raw"),
]

# bad training settings, refused by the trainer's first step (nnUNetTrainerLeFusion.check_lefusion_input, which
# nnUNetv2_train runs before nnU-Net writes anything; the cases above show it ends as one error line):
# (id, fold, plans identifier, environment, a fragment the error must hold)
SETTINGS_CASES = [
    ("missing-cache", 0, "nnUNetPlans", {**RATE, "LEFUSION_CACHE": "{base}/nowhere"}, "no synthetic cache"),
    ("cache-of-another-configuration", 0, "nnUNetPlans", {**RATE, "LEFUSION_CACHE": "{c2d}"}, "2d"),
    ("cache-of-other-plans", 0, "nnUNetPlansBadInput", {**RATE, "LEFUSION_CACHE": "{c3d}"}, "other plans"),
    ("settings-unknown-key", 0, "nnUNetPlans", {"LEFUSION_CONFIG": "{base}/unknown.yaml"}, "unknown keys"),
    ("settings-not-a-mapping", 0, "nnUNetPlans", {"LEFUSION_CONFIG": "{base}/list.yaml"}, "mapping"),
    ("settings-missing", 0, "nnUNetPlans", {"LEFUSION_CONFIG": "{base}/none.yaml"}, "cannot read"),
    ("unknown-mode", 0, "nnUNetPlans", {"LEFUSION_MODE": "bogus"}, "mode"),
    ("rate-not-a-number", 0, "nnUNetPlans", {"LEFUSION_RATE": "half"}, "LEFUSION_RATE"),
    ("rate-above-one", 0, "nnUNetPlans", {"LEFUSION_RATE": "1.5"}, "rate"),
    ("online-missing-checkpoint", 0, "nnUNetPlans",
     {**ONLINE, "LEFUSION_METHOD": "lefusion", "LEFUSION_CHECKPOINT": "{base}/none.pt"}, "does not exist"),
    ("online-cache-of-another-fold", 1, "nnUNetPlans", {**ONLINE, "LEFUSION_CACHE": "{c3d}"}, "fold 0, not fold 1"),
    ("online-target-share-not-a-lesion", 0, "nnUNetPlans", {**ONLINE, "LEFUSION_TARGET_SHARE": "2=0.2"},
     "not lesion labels"),
    ("online-device-missing", 0, "nnUNetPlans", {**ONLINE, "LEFUSION_DEVICE": "cuda:7"}, "cuda:7"),
]


@pytest.fixture(scope="module")
def world(phantom_dataset, nnunet_dirs, tmp_path_factory) -> dict:
    """Real files the bad inputs point at; the fold splits exist (as after the first training), so that nothing a
    refused command does may write them."""
    base = tmp_path_factory.mktemp("bad_inputs")
    for fold in (0, 1):
        DatasetContext(phantom_dataset, "3d_fullres", fold).split
    for configuration in ("3d_fullres", "2d"):
        run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", configuration, "-f", "0", "-n", "1",
                "--cache", str(base / configuration))
    pre = Path(nnunet_dirs["nnUNet_preprocessed"]) / phantom_dataset
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlansBadInput"
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0  # other normalisation
    other_plans = pre / "nnUNetPlansBadInput.json"
    other_plans.write_text(json.dumps(plans))
    run_cli("nnUNetv2_lefusion_phantom", "-d", "995", "-n", "3", "--fov", "heart", "-o", str(base / "small_raw"))
    (base / "small_pre").mkdir()
    (base / "broken_raw" / "Dataset997_Broken").mkdir(parents=True)
    (base / "broken_raw" / "Dataset997_Broken" / "dataset.json").write_text('{"labels": {')
    (base / "notes.txt").write_text("not a checkpoint\n")
    finished = base / "bench_other" / "runs" / "real" / "seed_0"   # a run of another schedule than the tiny preset's
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({"arm": "real", "seed": 0, "epochs": 40, "iterations": 30}))
    (base / "broken.yaml").write_text("rate: [0.5\n")
    (base / "unknown.yaml").write_text("rate: 0.5\nstrength: 2\n")
    (base / "list.yaml").write_text("- 0.5\n")
    raw = Path(nnunet_dirs["nnUNet_raw"]) / phantom_dataset
    yield {"base": str(base), "c3d": str(base / "3d_fullres"), "c2d": str(base / "2d"), "masks": str(SHIPPED_MASKS),
           "sampler": str(SHIPPED_SAMPLER), "notes": str(base / "notes.txt"),
           "image": str(next((raw / "imagesTr").glob("*.nii.gz"))),
           "label": str(next((raw / "labelsTr").glob("*.nii.gz"))),
           "roots": [*nnunet_dirs.values(), str(base)]}
    other_plans.unlink()


def snapshot(roots: list[str]) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: (size, mtime in ns)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                out[path] = (0 if name in dirnames else st.st_size, st.st_mtime_ns)
    return out


def in_subprocess(case: tuple) -> bool:
    """Whether a case runs its console script as a process: the first case of each command (the script's own
    wiring), nnUNetv2_train (nnU-Net's), and every case that changes nnU-Net's folder variables (nnU-Net reads them
    once, at import). The others call the script's entry point in this process: the same code after the wiring."""
    name, command, env, unset, _ = case
    first = next(c[0] for c in CASES if c[1][0] == command[0]) == name
    return first or command[0] == "nnUNetv2_train" or any(k.startswith("nnUNet_") for k in [*env, *unset])


def run_entry_point(command: list[str], env: dict[str, str], monkeypatch, capsys) -> subprocess.CompletedProcess:
    """The entry point a console script calls, run in this process with that script's name and arguments."""
    (script,) = entry_points(group="console_scripts", name=command[0])
    main = script.load()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", list(command))
    capsys.readouterr()
    try:
        code = main(command[1:])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(command, code, out.out, out.err)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(world, case, tmp_path, monkeypatch, capsys):
    _, command, env, unset, fragment = case
    for var in (*LEFUSION_VARS, *unset):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # a command that writes into the working folder would show up below
    fill = {k: v for k, v in world.items() if isinstance(v, str)}
    command = [part.format(**fill) for part in command]
    env = {k: v.format(**fill) for k, v in env.items()}
    roots = world["roots"] + [str(tmp_path)] + [v for k, v in env.items() if k.startswith("nnUNet_")]
    before = snapshot(roots)
    result = (run_cli(*command, env=env, check=False) if in_subprocess(case)
              else run_entry_point(command, env, monkeypatch, capsys))
    lines = error_lines(result)  # asserts there is no traceback
    assert result.returncode != 0, result.stdout[-2000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{command[0]}: error: ") and fragment in lines[0], lines[0]
    after = snapshot(roots)
    assert after == before, (f"left behind: {sorted(set(after) - set(before))}, changed: "
                             f"{sorted(k for k in before if k in after and after[k] != before[k])}")


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_bad_training_settings_are_refused_before_nnunet_writes_anything(world, case, phantom_dataset, nnunet_dirs,
                                                                         monkeypatch, capsys):
    from nnunet_lefusion.nnunet.trainer import nnUNetTrainerLeFusion

    _, fold, plans_name, env, fragment = case
    for var in LEFUSION_VARS:
        monkeypatch.delenv(var, raising=False)
    fill = {k: v for k, v in world.items() if isinstance(v, str)}
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**fill))
    plans = json.loads((Path(nnunet_dirs["nnUNet_preprocessed"]) / phantom_dataset / f"{plans_name}.json").read_text())
    before = snapshot(world["roots"])
    capsys.readouterr()
    with pytest.raises(LeFusionExit) as refused:
        nnUNetTrainerLeFusion.check_lefusion_input(plans, "3d_fullres", fold)
    assert refused.value.code == 2 and fragment in str(refused.value), str(refused.value)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f": error: {refused.value}" in lines[0], lines
    assert snapshot(world["roots"]) == before

def test_every_command_is_covered():
    import re

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    commands = set(re.findall(r'"(nnUNetv2_lefusion_\w+)=', setup)) | {"nnUNetv2_train"}
    assert len(commands) == 11 and commands == {c[1][0] for c in CASES}, commands ^ {c[1][0] for c in CASES}
    assert len(CASES) >= 25


def test_stub_defines_nothing_once_the_package_is_gone(tmp_path):
    """The registered stub, with nnunet_lefusion unimportable: it imports cleanly and nnU-Net's lookup still finds
    its own trainers in the folder; the unguarded stub of earlier versions broke that lookup."""
    code = f"""
import sys
sys.modules["nnunet_lefusion"] = None  # uninstalled: every import of it fails like a missing package
sys.path.insert(0, {str(tmp_path)!r})
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
folder = {str(tmp_path / "ext")!r}
assert recursive_find_python_class(folder, "nnUNetTrainerLeFusion", "ext") is None
found = recursive_find_python_class(folder, "nnUNetTrainer", "ext")
assert found is not None and found.__name__ == "nnUNetTrainer", found
print("OK")
"""
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "__init__.py").write_text("")
    (ext / STUB_NAME).write_text(STUB_SOURCE)  # imported first: the lookup walks the modules in name order
    (ext / "zz_own_trainers.py").write_text("from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    (ext / STUB_NAME).write_text("from nnunet_lefusion.nnunet.trainer import *  # noqa\n")  # the old stub
    shutil.rmtree(ext / "__pycache__", ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "nnunet_lefusion" in result.stderr, "the test must tell the stubs apart"


@pytest.mark.slow
def test_resumed_training_keeps_the_lefusion_statistics(world, phantom_dataset, nnunet_dirs, monkeypatch):
    """A real short 2d training (1 epoch), then nnUNetv2_train --c to 2 epochs: the statistics file lists both
    epochs, and its totals count both; an entry for an epoch after the checkpoint is dropped and counted anew."""
    for var in LEFUSION_VARS:
        monkeypatch.delenv(var, raising=False)
    trainer = "nnUNetTrainerLeFusion_short"
    env = {"LEFUSION_RATE": "0.5", "LEFUSION_CACHE": world["c2d"], "LEFUSION_ITERS": "3", "LEFUSION_VAL_ITERS": "1"}
    command = ["nnUNetv2_train", "990", "2d", "0", "-tr", trainer, "-device", "cpu"]
    run_cli(*command, env={**env, "LEFUSION_EPOCHS": "1"})
    fold = Path(nnunet_dirs["nnUNet_results"], phantom_dataset, f"{trainer}__nnUNetPlans__2d", "fold_0")
    first = json.loads((fold / "lefusion_stats.json").read_text())
    assert [e["epoch"] for e in first["epochs"]] == [0] and first["total_loads"] == first["epochs"][0]["loads"] > 0
    stale = {**first, "epochs": first["epochs"] + [{"epoch": 1, "loads": 1000, "synthetic": 1000}]}
    (fold / "lefusion_stats.json").write_text(json.dumps(stale))  # as if epoch 1 ran after the checkpoint
    run_cli(*command, "--c", env={**env, "LEFUSION_EPOCHS": "2"})
    stats = json.loads((fold / "lefusion_stats.json").read_text())
    assert [e["epoch"] for e in stats["epochs"]] == [0, 1], stats
    assert stats["epochs"][0] == first["epochs"][0] and stats["epochs"][1]["loads"] < 1000
    assert stats["total_loads"] == sum(e["loads"] for e in stats["epochs"])
    assert stats["total_synthetic"] == sum(e["synthetic"] for e in stats["epochs"])
    assert torch.load(fold / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 2
