"""The official LeFusion release end to end: an official-format Emidec checkpoint (a small cardiac network in the
official file layout) with an official-format histogram-cluster JSON, in nnUNetv2_lefusion_sample,
nnUNetv2_lefusion_synthesize and online mode (at 4 strided steps: the tests are about the release's files); cluster
files read per lesion class, bad ones refused in one line before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_lefusion.cli.sample import main as sample_main
from nnunet_lefusion.cli.synthesize import main as synthesize_main
from nnunet_lefusion.config import ENV_VARIABLES, load_settings
from nnunet_lefusion.diffusion.histograms import NUM_BINS, read_official_clusters
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model import ModelConfig
from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.online import synthesizer_options
from nnunet_lefusion.phantom import case_rng, generate_case
from nnunet_lefusion.synthesis.lefusion import LesionSampler, resynthesize
from tests.nnunet_helpers import one_error_line

QUICK = ["--strided-steps", "4", "--jumps", "1", "1"]
QUICK_KW = {"strided_steps": 4, "jumps": (1, 1)}
# the official Emidec centres: infarct (MI) mass in bins 10-14, no-reflow in bins 10-11
BRIGHT = ([0.0] * 10 + [0.0060314, 0.29192, 0.65561, 0.045838, 0.00060314, 0.0],
          [0.0] * 10 + [0.0667, 0.9333] + [0.0] * 4)
DARK = ([0.0] * 2 + [0.4, 0.6] + [0.0] * 12, [0.0] * 1 + [1.0] + [0.0] * 14)

pytestmark = pytest.mark.usefixtures("one_thread")


def write_official_clusters(path: Path, centers) -> Path:
    """A cluster file as the official ``hist_clusters/emidec_clusters.json`` is written."""
    path.write_text(json.dumps([{"n_class": len(centers), "centers": [list(c) for c in centers]}], indent=4))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    """An official-format cardiac checkpoint (2 channels, 32-value condition, narrower than the released network;
    trained with DataParallel: keys under ``denoise_fn.module.``, no metadata) and two official-format cluster
    files, bright and dark lesions."""
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    network = ModelConfig(dim=8, dim_mults=(1, 2), channels=2, cond_dim=32, attn_heads=2, attn_dim_head=8).build()
    wrapped = {**CosineSchedule(300).official_buffers(),
               **{f"denoise_fn.module.{k}": v for k, v in network.state_dict().items()}}
    torch.save({"step": 50000, "model": wrapped, "ema": dict(wrapped), "scaler": {}}, folder / "emidec.pt")
    return {"checkpoint": folder / "emidec.pt",
            "clusters": write_official_clusters(folder / "emidec_clusters.json", BRIGHT),
            "dark": write_official_clusters(folder / "dark_clusters.json", DARK)}


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    phantom = generate_case(case_rng(5, "Case_P001"), True, "heart")
    return phantom.image.astype(np.int16), phantom.label


def test_official_cluster_file_gives_one_histogram_per_lesion_class(tmp_path):
    path = write_official_clusters(tmp_path / "emidec_clusters.json", BRIGHT)
    emidec = read_official_clusters(path, num_classes=2)
    assert emidec.centers == [BRIGHT[0] + BRIGHT[1]] and emidec.cond_dim == 2 * NUM_BINS, \
        "Emidec: centre 0 is the infarct histogram, centre 1 the no-reflow one, used together"
    lidc = read_official_clusters(write_official_clusters(tmp_path / "lidc.json", [BRIGHT[0], DARK[0], BRIGHT[1]]), 1)
    assert lidc.centers == [BRIGHT[0], DARK[0], BRIGHT[1]], "one lesion class: each centre is an alternative"
    bad = {"not JSON": "{centers", "a mapping": json.dumps({"centers": list(BRIGHT)}),
           "15 bins": json.dumps([{"centers": [BRIGHT[0][:15], BRIGHT[1][:15]]}]),
           "negative": json.dumps([{"centers": [[-0.1] + BRIGHT[0][1:], BRIGHT[1]]}]),
           "three centres": json.dumps([{"centers": [BRIGHT[0], BRIGHT[1], DARK[0]]}])}
    for what, text in bad.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(LeFusionError, match="bad.json") as exc:
            read_official_clusters(tmp_path / "bad.json", 2)
        assert "\n" not in str(exc.value), what
    with pytest.raises(LeFusionError, match="cannot read"):
        read_official_clusters(tmp_path / "missing.json", 2)


def test_official_clusters_drive_the_official_sampler(release, case):
    image, label = case
    sampler = LesionSampler.load(release["checkpoint"], clusters=release["clusters"])
    assert sampler.in_plane_transposed and sampler.clusters.centers == [BRIGHT[0] + BRIGHT[1]]
    bright = resynthesize(image, label, sampler, seed=1, **QUICK_KW)
    dark = resynthesize(image, label, LesionSampler.load(release["checkpoint"], clusters=release["dark"]), seed=1,
                        **QUICK_KW)
    lesion = np.isin(label, (3, 4))
    for out in (bright, dark):
        assert out.dtype == image.dtype and np.array_equal(out[~lesion], image[~lesion])
    infarct = label == 3
    assert dark[infarct].mean() < image[infarct].mean() < bright[infarct].mean(), \
        "the lesions take the intensities of the file's histograms"
    with pytest.raises(LeFusionError, match="--clusters"):
        resynthesize(image, label, LesionSampler.load(release["checkpoint"]), seed=1, **QUICK_KW)


def test_sample_command_runs_the_official_release(release, case, tmp_path, capsys):
    image, label = case
    paths = {}
    for name, array in (("image", image), ("label", label)):
        written = sitk.GetImageFromArray(array)
        written.SetSpacing((1.4, 1.4, 10.0))
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(written, str(paths[name]))
    out = tmp_path / "out.nii.gz"
    args = ["-i", str(paths["image"]), "-l", str(paths["label"]), "-o", str(out), "--checkpoint",
            str(release["checkpoint"]), *QUICK, "-device", "cpu"]
    sample_main([*args, "--clusters", str(release["clusters"])])
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    lesion = np.isin(label, (3, 4))
    assert np.array_equal(after[~lesion], image[~lesion]) and not np.array_equal(after[lesion], image[lesion])
    assert "--clusters" in one_error_line(capsys, sample_main, args)
    assert "--clusters" in one_error_line(capsys, sample_main, [*args, "--clusters", str(release["clusters"]),
                                                                "--own-histogram"])
    (tmp_path / "three.json").write_text(json.dumps([{"centers": [BRIGHT[0], BRIGHT[1], DARK[0]]}]))
    assert "expected 2 official centres" in one_error_line(capsys, sample_main,
                                                           [*args, "--clusters", str(tmp_path / "three.json")])


def test_synthesize_refuses_an_official_checkpoint_without_good_clusters(phantom_dataset, release, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["-d", phantom_dataset, "-c", "3d_fullres", "-f", "0", "--method", "lefusion", "-n", "1", "--cache",
            str(cache), "--checkpoint", str(release["checkpoint"]), "-device", "cpu"]
    line = one_error_line(capsys, synthesize_main, args)
    assert "official checkpoint" in line and "--clusters FILE" in line
    (tmp_path / "lidc.json").write_text(json.dumps([{"centers": [BRIGHT[0], BRIGHT[1], DARK[0]]}]))
    assert "expected 2 official centres" in one_error_line(capsys, synthesize_main,
                                                           [*args, "--clusters", str(tmp_path / "lidc.json")])
    assert "--clusters only apply to --method lefusion" in one_error_line(
        capsys, synthesize_main, ["-d", phantom_dataset, "-n", "1", "--clusters", str(release["clusters"])])
    assert not cache.exists(), "refused before anything is written"


def test_clusters_setting_flows_from_yaml_and_environment(release, tmp_path, monkeypatch):
    for var in ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    settings = tmp_path / "lefusion.yaml"
    settings.write_text(f"clusters: {release['dark']}\n")
    monkeypatch.setenv("LEFUSION_CONFIG", str(settings))
    assert synthesizer_options(load_settings(), "cpu").clusters == str(release["dark"])
    monkeypatch.setenv("LEFUSION_CLUSTERS", str(release["clusters"]))
    assert synthesizer_options(load_settings(), "cpu").clusters == str(release["clusters"]), \
        "the variable overrides the settings file"


@pytest.mark.slow
def test_synthesize_command_runs_the_official_release(phantom_dataset, release, tmp_path):
    cache = tmp_path / "cache"
    synthesize_main(["-d", phantom_dataset, "-c", "3d_fullres", "-f", "0", "--method", "lefusion", "-n", "1",
                     "--cache", str(cache), "--checkpoint", str(release["checkpoint"]), "--clusters",
                     str(release["clusters"]), "-device", "cpu", "--strided-steps", "4"])
    manifest = Manifest.load(cache)
    assert len(manifest.cases) == 1
    run = manifest.runs[-1]
    assert {g["role"]: g["path"] for g in run["generators"]} == {
        "sampler": str(release["checkpoint"].resolve()), "histogram clusters": str(release["clusters"].resolve())}
    assert str(release["clusters"].resolve()) in run["request"]["generators"], "another file is another run"


@pytest.mark.slow
def test_online_mode_runs_the_official_release(phantom_dataset, release, tmp_path, monkeypatch):
    from tests.test_online import make_trainer

    for var in ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "pool"
    for key, value in {"LEFUSION_MODE": "online", "LEFUSION_RATE": "1", "LEFUSION_CACHE": str(cache),
                       "LEFUSION_METHOD": "lefusion", "LEFUSION_CHECKPOINT": str(release["checkpoint"]),
                       "LEFUSION_CLUSTERS": str(release["clusters"]), "LEFUSION_DEVICE": "cpu",
                       "LEFUSION_POOL_MAX": "1", "LEFUSION_STRIDED_STEPS": "4"}.items():
        monkeypatch.setenv(key, value)
    trainer = make_trainer(phantom_dataset)
    trainer.get_tr_and_val_datasets()
    producer = trainer.lefusion_source
    try:
        assert producer.synthesizer.sampler.clusters.centers == [BRIGHT[0] + BRIGHT[1]]
        made = producer.produce(epoch=0)
        manifest = Manifest.load(cache)
        assert set(manifest.cases) == {made} and manifest.cases[made]["method"] == "lefusion"
        assert str(release["clusters"].resolve()) in manifest.runs[-1]["request"]["generators"]
        assert manifest.runs[-1]["request"]["strided_steps"] == 4
    finally:
        producer.close()
