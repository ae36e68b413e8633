"""The lesion benchmarks run end to end on a tiny sampler and print their tables (figures are checked for sanity,
not for quality: a 4-step tiny model is no texture model)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_lefusion.training.loop import FINAL
from tests.test_train_sampler import dataset, train_tiny  # noqa: F401  (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampler")
    train_tiny(out, 4, "--cond-drop", "0.5")
    return out / FINAL


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_lesion_quality_prints_both_outputs_and_an_untouched_background(dataset, checkpoint):
    out = _run("lesion_quality.py", "--checkpoint", str(checkpoint), "--raw", str(dataset), "--cases", "1",
               "--full-schedule", "1/1", "--batch", "2")
    assert out.count("background max |difference| = 0\n") == 2  # fast and full
    distances, textures = ({line[:44].strip(): line[44:].split() for line in table.splitlines() if "|" in line[44:]}
                           for table in out.split("\nTexture:"))
    variants = ("fast", "fast + histogram matching", "full 1/1", "full 1/1 + histogram matching")
    assert set(distances) >= {*variants, "ref: healthy myocardium as lesion", "ref: real lesion split in halves"}, out
    assert set(textures) >= {*variants, "real lesions"}, out
    # with the lesions' own histograms as condition, matching brings the intensities to the real ones
    matched, raw = (float(distances[name][2]) for name in ("fast + histogram matching", "fast"))
    assert matched < 0.2 < raw


@pytest.fixture(scope="module")
def aware_checkpoint(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aware_sampler")
    train_tiny(out, 2, "--cond-drop", "0.5", "--lesion-maps")
    return out / FINAL


@pytest.mark.parametrize("network", ["checkpoint", "aware_checkpoint"])
def test_condition_response_prints_every_timestep(dataset, network, request):
    out = _run("condition_response.py", "--checkpoint", str(request.getfixturevalue(network)), "--raw", str(dataset),
               "--cases", "2", "--timesteps", "299", "100")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["299", "100"]
    assert all(len(row) == 4 and all(abs(float(v)) <= 2 for v in row[1:]) for row in rows)
