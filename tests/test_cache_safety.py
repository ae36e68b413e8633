"""The cache survives concurrency, interruption and bad input: real synthesize commands (copy-paste) on Dataset990,
run as parallel parts, concurrent appenders and killed processes; the kernel lock, killed writers and two online
trainings' pools with real processes (``tests/cache_workers.py``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_lefusion.config import TrainerSettings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import resolve_lesion_labels
from nnunet_lefusion.nnunet import cache_lock
from nnunet_lefusion.nnunet.cache import CASE_FILES, Manifest
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.online import OnlineProducer, online_labels
from nnunet_lefusion.nnunet.preprocess import load_raw_case
from tests.nnunet_helpers import BIN, error_lines, run_cli

SYNTH = ["-d", "990", "-c", "3d_fullres", "-f", "0"]


def start(cache: Path, *args: str) -> subprocess.Popen:
    """A synthesize command running in the background."""
    return subprocess.Popen([str(BIN / "nnUNetv2_lefusion_synthesize"), *SYNTH, "--cache", str(cache), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def listed(cache: Path) -> int:
    """Cases the manifest lists now (0 while there is none or it cannot be read)."""
    try:
        return len(json.loads((cache / "manifest.json").read_text())["cases"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def assert_complete(cache: Path) -> Manifest:
    """Every listed case has its three files, nothing else is left behind, and no number is used twice."""
    manifest = Manifest.load(cache)
    names = {p.name for p in cache.iterdir()}
    expected = {"manifest.json", cache_lock.LOCK} | {f"{i}{s}" for i in manifest.cases for s in (".b2nd", "_seg.b2nd", ".pkl")}
    assert names == expected, f"unexpected {sorted(names - expected)}, missing {sorted(expected - names)}"
    slots = [c["slot"] for c in manifest.cases.values()]
    assert len(slots) == len(set(slots)) and sorted(slots) == list(range(manifest.next_index))
    return manifest


def content(cache: Path, manifest: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {i: (blosc2.open(str(cache / f"{i}.b2nd"), mode="r")[:], blosc2.open(str(cache / f"{i}_seg.b2nd"),
                                                                               mode="r")[:]) for i in manifest.cases}


def assert_same_cases(a: Path, b: Path) -> None:
    ma, mb = Manifest.load(a), Manifest.load(b)
    assert sorted(ma.cases) == sorted(mb.cases)
    ca, cb = content(a, ma), content(b, mb)
    for i in ma.cases:
        assert np.array_equal(ca[i][0], cb[i][0]) and np.array_equal(ca[i][1], cb[i][1]), i


@pytest.fixture(scope="module")
def one_run(phantom_dataset, tmp_path_factory) -> Path:
    """The reference: 6 cases made by one uninterrupted run."""
    cache = tmp_path_factory.mktemp("one_run") / "cache"
    run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "6", "--cache", str(cache))
    return cache


def test_parts_at_once_equal_one_run(one_run, tmp_path):
    cache = tmp_path / "parts"
    parts = [start(cache, "-n", "6", "-num_parts", "2", "-part_id", str(p)) for p in (0, 1)]
    for proc in parts:
        finish(proc)
    manifest = assert_complete(cache)
    assert len(manifest.runs) == 1 and set(manifest.runs[0]["parts"]) == {"0", "1"}
    assert_same_cases(one_run, cache)


def test_appending_continues_over_the_training_cases(phantom_dataset, one_run, tmp_path):
    cache = tmp_path / "append"
    for seed in ("0", "1", "2"):
        run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "3", "--seed", seed, "--cache", str(cache))
    manifest = assert_complete(cache)
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    labels = resolve_lesion_labels(ctx.dataset_json)
    normal = {i for i in ctx.split[0] if not np.isin(load_raw_case(ctx, i).seg, labels.lesions).any()}
    for kind, pool in (("newmask", set(ctx.split[0]) - normal), ("normal", normal)):
        uses = Counter(c["source"] for c in manifest.cases.values() if c["kind"] == kind)
        counts = [uses[i] for i in pool]
        assert sum(counts) and max(counts) - min(counts) <= 1, f"{kind}: {uses} not spread over {sorted(pool)}"


def test_two_appenders_at_once_lose_nothing(one_run, tmp_path):
    cache = tmp_path / "appenders"
    run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "2", "--cache", str(cache))
    procs = [start(cache, "-n", "3", "--seed", "5"), start(cache, "-n", "3", "--seed", "5")]  # the same command twice
    for proc in procs:
        finish(proc)
    manifest = assert_complete(cache)
    assert len(manifest.cases) == 8 and len(manifest.runs) == 3
    assert sorted(r["first"] for r in manifest.runs) == [0, 2, 5]


@pytest.mark.parametrize("killed_after", [0, 2, 5])
def test_kill_9_then_the_same_command_completes_the_cache(one_run, tmp_path, killed_after):
    cache = tmp_path / "killed"
    proc = start(cache, "-n", "6")
    deadline = time.monotonic() + 120
    while listed(cache) < killed_after or not (cache / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert listed(cache) < 6
    run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "6", "--cache", str(cache))
    manifest = assert_complete(cache)
    assert len(manifest.runs) == 1 and len(manifest.cases) == 6
    assert_same_cases(one_run, cache)


def test_overwrite_is_refused_while_another_writer_runs(one_run, tmp_path):
    cache = tmp_path / "busy"
    proc = start(cache, "-n", "400")  # runs far longer than the command below
    while not list(cache.glob(f"{cache_lock.WRITER_PREFIX}*")):
        assert proc.poll() is None
        time.sleep(0.02)
    res = run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "1", "--cache", str(cache), "--overwrite",
                  check=False)
    lines = error_lines(res)
    assert proc.poll() is None, "the writer must still run for this test to mean anything"
    assert res.returncode == 2 and len(lines) == 1 and "being written" in lines[0], res.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "1", "--cache", str(cache), "--overwrite")
    assert len(assert_complete(cache).cases) == 1


def test_relabelled_or_incomplete_cache_is_refused(phantom_dataset, one_run, nnunet_dirs, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in one_run.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    victim = next(copy.glob("*_seg.b2nd"))
    victim.unlink()
    res = run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "1", "--cache", str(copy), check=False)
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1 and "files are missing" in lines[0], res.stderr

    manifest = Manifest.load(one_run)
    label = Path(nnunet_dirs["nnUNet_raw"]) / phantom_dataset / "labelsTr" / f"{manifest.training_cases[0]}.nii.gz"
    original = label.read_bytes()
    try:
        image = sitk.ReadImage(str(label))
        array = sitk.GetArrayFromImage(image)
        array[array == 2] = 1  # a relabelling
        relabelled = sitk.GetImageFromArray(array)
        relabelled.CopyInformation(image)
        sitk.WriteImage(relabelled, str(label))
        res = run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "1", "--cache", str(one_run), check=False)
    finally:
        label.write_bytes(original)
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1 and "relabelled" in lines[0], res.stderr


def test_bad_parts_are_one_error_line(phantom_dataset, tmp_path):
    res = run_cli("nnUNetv2_lefusion_synthesize", *SYNTH, "-n", "2", "-num_parts", "2", "-part_id", "2",
                  "--cache", str(tmp_path / "c"), check=False)
    lines = error_lines(res)
    assert res.returncode == 2 and len(lines) == 1 and "-part_id" in lines[0], res.stderr
    assert not (tmp_path / "c").exists()


def worker(*args: str) -> subprocess.Popen:
    """A separate process using the cache (``tests/cache_workers.py``)."""
    return subprocess.Popen([sys.executable, "-m", "tests.cache_workers", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def killed_holder(cache: Path, tmp_path: Path) -> subprocess.Popen:
    """A writer process that holds the cache lock, killed with SIGKILL while it holds it."""
    ready = tmp_path / "holding"
    holder = worker("hold", cache, ready)
    wait_until(ready.exists, holder)
    return holder


def empty_manifest(cache: Path) -> None:
    cache.mkdir()
    Manifest("Dataset000_x", "3d_fullres", "id", "nnUNetPlans", 0, "fp", []).save(cache)


def test_three_contenders_after_a_kill_9_take_the_lock_one_at_a_time(tmp_path):
    cache, probe = tmp_path / "cache", tmp_path / "probe"
    empty_manifest(cache)
    probe.mkdir()
    holder = killed_holder(cache, tmp_path)
    n = 25
    contenders = [worker("contend", cache, name, n, probe) for name in "abc"]
    for proc in contenders:
        wait_until(lambda: len(list(probe.glob("*.waiting"))) == 3, proc)
    time.sleep(0.5)  # they now wait for the lock
    assert listed(cache) == 0, "nobody may update the manifest while the holder lives"
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    for proc in contenders:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, "two processes held the lock at once" if proc.returncode == 3 else err[-3000:]
    cases = Manifest.load(cache).cases
    assert sorted(cases) == sorted(f"{name}-{k}" for name in "abc" for k in range(n)), "an update was lost"
    assert (cache / cache_lock.LOCK).exists(), "the lock file stays: it is never deleted or renamed"


def test_a_writer_killed_holding_the_lock_does_not_block_the_next(tmp_path):
    cache = tmp_path / "cache"
    empty_manifest(cache)
    store = CacheStore(cache)
    holder = killed_holder(cache, tmp_path)
    with pytest.raises(LeFusionError, match="stayed locked"):
        with store.locked(timeout=0.3):
            pass
    assert len(store.other_writers()) == 1, "the live holder is a writer"  # (it holds the lock, so without it)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate()
    t0 = time.monotonic()
    with store.locked(timeout=5):
        waited = time.monotonic() - t0
        assert store.other_writers() == [], "a killed writer is gone at once (no pid, no heartbeat age)"
        marks = (cache_lock.TMP_PREFIX, cache_lock.WRITER_PREFIX)
        assert len([p for p in cache.iterdir() if p.name.startswith(marks)]) == 2, "the killed writer's files"
        store.remove_dead_leftovers()
    assert waited < 1.0
    assert sorted(p.name for p in cache.iterdir()) == [cache_lock.LOCK, "manifest.json"]
    assert store.reserve_index() == 0 and store.reserve_index() == 1


def test_two_online_trainings_of_one_fold_keep_their_own_pools(phantom_dataset, tmp_path):
    cache, probe = tmp_path / "cache", tmp_path / "probe"
    probe.mkdir()
    producers = [worker("pool", phantom_dataset, cache, name, 2, probe) for name in ("1", "2")]
    runs = {}
    for proc in producers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        runs[result["run"]] = result["made"]
    manifest = Manifest.load(cache)
    assert len(runs) == 2 and len(manifest.online_ids()) == 2
    for run, made in runs.items():  # pool_max 1: each run's newest stays, only its own oldest was retired
        assert manifest.online_ids(run) == made[1:], (run, made, manifest.online_ids())
    assert sorted(p.name for p in cache.iterdir() if p.name != cache_lock.LOCK) == sorted(
        ["manifest.json"] + [f"{i}{s}" for i in manifest.cases for s in CASE_FILES])
    # A training started again after both ended adopts their cases and retires beyond its pool.
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    settings = TrainerSettings(mode="online", online_cases_per_epoch=1, pool_max=1).validate()
    again = OnlineProducer(ctx, cache, online_labels(ctx, cache), settings, "cpu", log=lambda *_: None)
    again.start()
    try:
        newest = again.produce(epoch=0)
    finally:
        again.close()
    manifest = Manifest.load(cache)
    assert manifest.online_ids() == [newest] and manifest.online_ids(again.run["id"]) == [newest]


def test_case_files_and_folder_reach_the_disk_before_the_manifest_lists_them(tmp_path, monkeypatch):
    """A power loss cannot leave a listed but truncated case: the order of the real fsync and rename calls."""
    cache = tmp_path.resolve() / "cache"
    empty_manifest(cache)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    seg = np.zeros((1, 4, 8, 8), dtype=np.int16)
    CacheStore(cache).add("Case_001__syn0000", np.ones((1, 4, 8, 8)), seg, {"spacing": [1, 1, 1]}, (4, 8, 8),
                          {"source": "Case_001", "slot": 0, "run": 0})
    first = {event: k for k, event in reversed(list(enumerate(events)))}
    last = {event: k for k, event in enumerate(events)}
    manifest = last[("rename", str(cache / "manifest.json"))]
    for suffix in CASE_FILES:
        final = str(cache / f"Case_001__syn0000{suffix}")
        flushed = [k for k, (kind, path) in enumerate(events)
                   if kind == "fsync" and path.endswith(f"~Case_001__syn0000{suffix}")]
        assert flushed and flushed[0] < first[("rename", final)], f"{suffix} renamed before it was flushed"
        assert last[("rename", final)] < first[("fsync", str(cache))] < manifest, "folder flushed before listing"
    assert last[("fsync", str(cache))] > manifest, "the manifest's rename is flushed too"
    assert Manifest.load(cache).cases == {"Case_001__syn0000": {"source": "Case_001", "slot": 0, "run": 0}}
