"""nnUNetv2_lefusion_train_sampler and the generic training loop, on a tiny heart-FOV phantom dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nnunet_lefusion.cli.train_sampler import main as train_main
from nnunet_lefusion.nnunet.context import training_cases
from nnunet_lefusion.diffusion.histograms import lesion_histograms
from nnunet_lefusion.diffusion.level_offset import offset_map
from nnunet_lefusion.diffusion.loss import lesion_channel_masks
from nnunet_lefusion.diffusion.sampler import SamplerConfig
from nnunet_lefusion.diffusion.schedule import CosineSchedule
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.model.config import ModelConfig
from nnunet_lefusion.phantom import write_dataset
from nnunet_lefusion.pretrained import SHIPPED
from nnunet_lefusion.model.checkpoint import META_KEY, OPTIMIZER_KEY, load_checkpoint
from nnunet_lefusion.nnunet.provenance import check_no_leak, label_hash
from nnunet_lefusion.nnunet.generators import SynthesizerOptions, generator_records
from nnunet_lefusion.training.loop import FINAL, LATEST, LOG_NAME, TrainConfig, train
from nnunet_lefusion.synthesis.lefusion import LesionSampler
from nnunet_lefusion.roi import covering_rois
from nnunet_lefusion.training.roi_data import load_roi_set, read_volume
from nnunet_lefusion.training.sampler import LesionLoss, sampler_meta
from tests.nnunet_helpers import one_error_line

LESION_ID, NORMAL_ID = 981, 982
ROI = ("2", "32", "32")  # Z, Y, X: small enough for CPU tests, large enough to hold most of the phantom lesions


pytestmark = pytest.mark.usefixtures("one_thread")


def lesion_dataset(raw_root: str) -> Path:
    """Dataset981: 4 heart-FOV phantom cases (3 with lesions), written once per session."""
    found = sorted(Path(raw_root).glob(f"Dataset{LESION_ID}_*"))
    if found:
        return found[0]
    return write_dataset(LESION_ID, 4, 0, raw_root, name="LeFusionTiny", fov="heart", normal_fraction=0.25)


def train_tiny(out: Path, steps: int, *extra: str) -> None:
    """The training command with the tiny model on Dataset981, writing to ``out``."""
    train_main(["-d", str(LESION_ID), "--config", "tiny", "--roi", *ROI, "--steps", str(steps), "--batch-size", "1",
                "--checkpoint-every", "2", "--lr", "1e-3", "--quiet", "-o", str(out), *extra])


@pytest.fixture(scope="module")
def dataset(nnunet_dirs) -> Path:
    return lesion_dataset(nnunet_dirs["nnUNet_raw"])


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_uninterrupted_run(dataset, tmp_path):
    train_tiny(tmp_path / "straight", 4)
    train_tiny(tmp_path / "resumed", 2)
    train_tiny(tmp_path / "resumed", 4, "--resume")
    a = torch.load(tmp_path / "straight" / FINAL, weights_only=True)
    b = torch.load(tmp_path / "resumed" / FINAL, weights_only=True)
    assert a["step"] == b["step"] == 4
    assert _states_equal(a["model"], b["model"])
    assert _states_equal(a["ema"], b["ema"])
    log = (tmp_path / "resumed" / LOG_NAME).read_text()
    assert "step 2 loss" in log and "step 4 loss" in log


def test_checkpoint_layout_and_metadata(dataset, tmp_path):
    train_tiny(tmp_path / "run", 2)
    raw = torch.load(tmp_path / "run" / FINAL, weights_only=True)
    assert {"step", "model", "ema", "scaler", META_KEY, OPTIMIZER_KEY} <= set(raw)
    assert any(k.startswith("denoise_fn.") for k in raw["model"]) and "betas" in raw["model"]
    ckpt = load_checkpoint(tmp_path / "run" / FINAL)
    assert ckpt.step == 2 and ckpt.num_steps == 300
    assert ckpt.config == ModelConfig.from_yaml(tmp_path / "run" / "model_config.yaml") == ModelConfig.from_yaml("tiny")
    meta = ckpt.meta
    assert meta.lesion_labels == [3, 4] and meta.extras["labels"] == LesionLabels.emidec().to_dict()
    assert meta.roi_size == [int(v) for v in ROI]
    assert meta.intensity["percentiles"] == [0.0, 100.0]
    centres, counts = meta.histogram_clusters, meta.extras["cluster_counts"]
    assert 1 <= len(centres) == len(counts) <= 3 and sum(counts) == meta.extras["training_cases"] == 3
    assert all(len(c) == 32 for c in centres)
    levels = meta.extras["cluster_organ_levels"]   # each cluster's healthy-myocardium median, in [-1, 1]
    assert len(levels) == len(centres) and all(-1 < v < 1 for v in levels)
    assert "mean_loss_weight" not in meta.extras  # the official loss
    assert (tmp_path / "run" / LATEST).is_file()


def test_mean_loss_weight_is_recorded(dataset, tmp_path):
    train_tiny(tmp_path / "mean", 1, "--mean-loss", "0.05")
    assert load_checkpoint(tmp_path / "mean" / FINAL).meta.extras["mean_loss_weight"] == 0.05


def test_lesion_normalisation_weighs_each_class_alike_and_is_recorded(dataset, tmp_path):
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    batch = rois.make_batch(np.random.default_rng(1), 4)
    masks = lesion_channel_masks(batch["label"], labels.lesions)
    present = int((masks.sum(dim=(0, 2, 3, 4)) > 0).sum())
    assert present == 2

    def zero_denoiser(x, t, cond):   # the loss is then each class's |noise| as the normalisation weighs it
        return torch.zeros_like(x)

    losses = {}
    for normalisation in ("volume", "lesion"):
        torch.manual_seed(0)
        losses[normalisation] = float(LesionLoss(labels.lesions, normalisation=normalisation)(zero_denoiser, batch))
    # lesion: E|N(0, 1)| = 0.80 per class, whatever its size; volume: each class times its share of the voxels
    assert losses["lesion"] == pytest.approx(0.80 * present, abs=0.15)
    assert losses["volume"] < 0.2 * losses["lesion"], losses
    train_tiny(tmp_path / "balanced", 1, "--loss-normalisation", "lesion")
    assert load_checkpoint(tmp_path / "balanced" / FINAL).meta.extras["loss_normalisation"] == "lesion"


def test_interrupted_loop_resumes_exactly(dataset, tmp_path):
    """A KeyboardInterrupt mid-run loses only the steps since the last checkpoint; the resumed run is exact."""
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    config = ModelConfig.from_yaml("tiny")
    meta = sampler_meta(labels, (2, 32, 32), rois)
    settings = TrainConfig(steps=5, batch_size=1, checkpoint_every=2, lr=1e-3, progress=False)
    calls = []

    def interrupted_batches(rng):
        calls.append(1)
        if len(calls) == 4:  # during step 4, after the checkpoint of step 2
            raise KeyboardInterrupt
        return rois.make_batch(rng, 1)

    def run(out, make_batch):
        torch.manual_seed(0)
        return train(config.build(), LesionLoss(labels.lesions), make_batch, out, meta, settings, resume=True)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupted_batches)
    assert load_checkpoint(tmp_path / "b" / LATEST).step == 2
    resumed = run(tmp_path / "b", lambda rng: rois.make_batch(rng, 1))
    straight = run(tmp_path / "a", lambda rng: rois.make_batch(rng, 1))
    assert resumed.start_step == 2 and straight.start_step == 0
    assert resumed.losses == straight.losses[2:]
    a = torch.load(tmp_path / "a" / FINAL, weights_only=True)
    b = torch.load(tmp_path / "b" / FINAL, weights_only=True)
    assert _states_equal(a["model"], b["model"]) and _states_equal(a["ema"], b["ema"])


def test_roi_set_keeps_lesion_cases_and_flips_consistently(dataset):
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    assert len(rois) == 3 and all(i.startswith("Case_P") for i in rois.identifiers)
    assert rois.images.min() >= -1 and rois.images.max() <= 1
    batch = rois.make_batch(np.random.default_rng(0), 16)
    assert batch["x0"].shape == (16, 2, 2, 32, 32) and torch.equal(batch["x0"][:, 0], batch["x0"][:, 1])
    # every image comes with its own (possibly flipped) label map: flipped pairs are flipped together
    for image, label in zip(batch["x0"][:, 0].numpy(), batch["label"].numpy()):
        i = next(j for j in range(len(rois)) if np.array_equal(rois.images[j], image)
                 or np.array_equal(np.flip(rois.images[j], 1), image))
        flipped = not np.array_equal(rois.images[i], image)
        assert np.array_equal(np.flip(rois.labels[i], 1) if flipped else rois.labels[i], label)


def _error(capsys, argv: list[str]) -> str:
    return one_error_line(capsys, train_main, argv)


def test_bad_input_is_one_error_line(dataset, nnunet_dirs, tmp_path, capsys):
    raw = nnunet_dirs["nnUNet_raw"]
    if not list(Path(raw).glob(f"Dataset{NORMAL_ID}_*")):
        write_dataset(NORMAL_ID, 2, 0, raw, name="NoLesions", fov="heart", normal_fraction=1.0)
    base = ["--config", "tiny", "--roi", *ROI, "--steps", "1", "--quiet"]
    assert "not found" in _error(capsys, ["-d", "777", *base, "-o", str(tmp_path / "x")])
    assert "none of the 2 training cases" in _error(capsys, ["-d", str(NORMAL_ID), *base, "-o", str(tmp_path / "y")])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({**ModelConfig.from_yaml("tiny").to_dict(), "cond_dim": 16}))
    assert "cond_dim 16" in _error(capsys, ["-d", str(LESION_ID), "--config", str(wrong), "--roi", *ROI, "-o",
                                            str(tmp_path / "z")])
    assert "divisible" in _error(capsys, ["-d", str(LESION_ID), "--config", "tiny", "--roi", "2", "31", "32",
                                          "-o", str(tmp_path / "w")])
    train_tiny(tmp_path / "run", 2)
    assert "--resume" in _error(capsys, ["-d", str(LESION_ID), *base, "-o", str(tmp_path / "run")])
    assert "different settings" in _error(capsys, ["-d", str(LESION_ID), "--config", "tiny", "--roi", "2", "32", "24",
                                                   "--steps", "4", "--resume", "--quiet", "-o", str(tmp_path / "run")])
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({**ModelConfig.from_yaml("tiny").to_dict(), "dim": 8}))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert "model config" in _error(capsys, ["-d", str(LESION_ID), "--config", str(wider), "--roi", *ROI, "--steps",
                                             "4", "--resume", "--quiet", "-o", str(tmp_path / "run")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # a refused resume writes nothing


def test_init_starts_from_a_samplers_weights_and_its_cases_count_as_seen(dataset, tmp_path, capsys):
    train_tiny(tmp_path / "base", 2)
    base_file = str(tmp_path / "base" / FINAL)
    base = load_checkpoint(base_file)
    tune = ["-d", str(LESION_ID), "--init", base_file, "--roi", *ROI, "--steps", "1", "--batch-size", "1", "--quiet"]
    train_main([*tune, "--lr", "1e-9", "-o", str(tmp_path / "tuned")])   # one step too small to move the weights
    tuned = load_checkpoint(tmp_path / "tuned" / FINAL)
    assert tuned.config == base.config == ModelConfig.from_yaml("tiny")   # the config comes from --init
    assert all(torch.allclose(tuned.model_state[k], v, atol=1e-6) for k, v in base.ema_state.items())
    assert not _states_equal(base.ema_state, base.model_state)   # so it started from the EMA weights, not these
    start = tuned.meta.extras["initialised_from"]
    assert start == {"file": FINAL, "step": 2, "training_data": [base.meta.training_data]}
    records = generator_records("lefusion", SynthesizerOptions(str(tmp_path / "tuned" / FINAL)))
    assert [r["role"] for r in records] == ["sampler", f"sampler (its initial weights, {FINAL})"]
    train_main([*tune[:3], str(tmp_path / "tuned" / FINAL), *tune[4:], "-o", str(tmp_path / "again")])
    again = load_checkpoint(tmp_path / "again" / FINAL).meta.extras["initialised_from"]["training_data"]
    assert again == [tuned.meta.training_data, base.meta.training_data]   # what every ancestor saw
    case, _, label_file = training_cases(dataset)[0]
    with pytest.raises(LeFusionError, match="initial weights"):
        check_no_leak(records[1:], {case: label_hash(label_file)}, 0, "refused")
    assert "another --config" in _error(capsys, [*tune, "--config", "small", "-o", str(tmp_path / "x")])
    assert "--histogram-scale (1.0)" in _error(capsys, [*tune, "--histogram-scale", "16", "-o", str(tmp_path / "y")])
    masks = [*tune[:2], "--init", str(SHIPPED["mask generator"]), *tune[4:], "-o", str(tmp_path / "z")]
    assert "not a LeFusion sampler" in _error(capsys, masks)


@pytest.mark.slow
def test_loss_falls(dataset, tmp_path):
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    config = ModelConfig.from_yaml("tiny")
    torch.manual_seed(0)
    result = train(config.build(), LesionLoss(labels.lesions), lambda rng: rois.make_batch(rng, 2), tmp_path,
                   sampler_meta(labels, (2, 32, 32), rois),
                   TrainConfig(steps=60, batch_size=2, checkpoint_every=60, lr=1e-3, progress=False))
    first, last = np.mean(result.losses[:15]), np.mean(result.losses[-15:])
    assert last < 0.8 * first, (first, last)


def test_histogram_scale_and_condition_dropout(dataset, tmp_path):
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    model = ModelConfig.from_yaml("tiny").build()
    batch = rois.make_batch(np.random.default_rng(0), 4)
    seen = []

    def spy(x, t, cond):
        seen.append(cond.detach().clone())
        return model(x, t, cond)

    spy.null_cond_emb = model.null_cond_emb
    LesionLoss(labels.lesions, histogram_scale=16.0)(spy, batch)
    torch.testing.assert_close(seen[-1], batch["cond"] * 16.0)  # the network sees the scaled histograms
    torch.manual_seed(1)
    LesionLoss(labels.lesions, cond_drop=0.5)(spy, batch)
    dropped = [torch.equal(row, model.null_cond_emb[0]) for row in seen[-1]]
    assert any(dropped) and not all(dropped)  # some rows carry the null condition, the others their histogram
    for row, was_dropped in zip(seen[-1], dropped):
        assert was_dropped or any(torch.equal(row, c) for c in batch["cond"])
    model.zero_grad()
    torch.manual_seed(1)
    LesionLoss(labels.lesions, cond_drop=0.5)(model, batch).backward()
    assert model.null_cond_emb.grad is not None and model.null_cond_emb.grad.abs().sum() > 0
    with pytest.raises(LeFusionError):
        LesionLoss(labels.lesions, cond_drop=1.0)

    train_tiny(tmp_path / "scaled", 1, "--histogram-scale", "16", "--cond-drop", "0.2")
    sampler = LesionSampler.load(tmp_path / "scaled" / FINAL)
    assert sampler.histogram_scale == 16.0
    conds = []
    sampler.model.register_forward_pre_hook(lambda module, args: conds.append(args[2].clone()))
    _, image_file, label_file = next(c for c in training_cases(dataset) if "P" in c[0])
    image, label = read_volume(image_file)[0], read_volume(label_file)[0]
    sampler.resynthesize_many([image], [label], np.random.default_rng(0), SamplerConfig(1, 1, strided_steps=2), "case")
    windows = covering_rois(image, label, labels.host, labels.lesions, sampler.roi_size)
    own = lesion_histograms(windows[0].intensity.to_unit(image), label, labels.lesions)   # the whole lesion's
    assert len(conds) == 2 * len(windows) and all(torch.allclose(c[0], torch.from_numpy(own) * 16.0) for c in conds)


def test_lesion_maps_fine_tune_starts_as_its_init_and_learns_from_the_maps(dataset, tmp_path):
    train_tiny(tmp_path / "base", 2)
    base = load_checkpoint(tmp_path / "base" / FINAL)
    train_main(["-d", str(LESION_ID), "--init", str(tmp_path / "base" / FINAL), "--lesion-maps", "--roi", *ROI,
                "--steps", "1", "--batch-size", "1", "--lr", "1e-9", "--quiet", "-o", str(tmp_path / "aware")])
    aware = LesionSampler.load(tmp_path / "aware" / FINAL)
    assert aware.lesion_aware and aware.model.config.channels == 6 and aware.model.config.out_channels == 2
    weight = aware.model.state_dict()["init_conv.weight"]
    assert weight[:, 2:].abs().max() < 1e-6   # the map inputs start at zero ...
    x, t, cond = torch.randn(1, 2, 2, 32, 32), torch.tensor([50]), torch.rand(1, 32)
    with torch.no_grad():   # ... so the widened network starts out as the one it came from
        torch.testing.assert_close(aware.model(torch.cat((x, torch.rand(1, 4, 2, 32, 32)), dim=1), t, cond),
                                   base.build()(x, t, cond), atol=1e-4, rtol=1e-4)
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    aware.model.zero_grad()
    batch = rois.make_batch(np.random.default_rng(0), 4)
    LesionLoss(labels.lesions, cond_drop=0.5, lesion_aware=True)(aware.model, batch).backward()
    assert aware.model.init_conv.weight.grad[:, 2:].abs().sum() > 0   # the loss reaches the map weights
    _, image_file, label_file = next(c for c in training_cases(dataset) if "P" in c[0])
    image, label = read_volume(image_file)[0], read_volume(label_file)[0]
    [(sampled, matched)] = aware.resynthesize_pairs([image], [label], np.random.default_rng(0),
                                                    SamplerConfig(1, 1, strided_steps=2))
    lesion = np.isin(label, labels.lesions)
    assert np.array_equal(sampled[~lesion], image[~lesion]) and np.array_equal(matched[~lesion], image[~lesion])


def test_level_offset_trains_lesions_around_0_and_samples_them_at_their_conditions_level(dataset, tmp_path):
    labels = LesionLabels.emidec()
    rois = load_roi_set(training_cases(dataset), labels, (2, 32, 32), progress=False)
    batch = rois.make_batch(np.random.default_rng(0), 4)
    seen = []
    model = ModelConfig.from_yaml("tiny").build()

    def spy(x, t, cond):
        seen.append((x.detach().clone(), t))
        return model(x, t, cond)

    for offset in (False, True):
        torch.manual_seed(3)   # the same timesteps and noise: the inputs differ by sqrt(abar_t) times the shift
        LesionLoss(labels.lesions, level_offset=offset)(spy, batch)
    masks = lesion_channel_masks(batch["label"], labels.lesions)
    shifts = offset_map(masks, batch["cond"])
    (plain, t), (moved, _) = seen
    schedule = CosineSchedule(300)
    for b in range(4):
        torch.testing.assert_close((plain[b] - moved[b]) / schedule.alpha_bar(int(t[b])) ** 0.5,
                                   shifts[b].expand_as(plain[b]), atol=1e-4, rtol=1e-4)
        for k in range(2):   # class k, moved, sits at 0 (within the histogram's bin rounding)
            lesion = masks[b, k].bool()
            if lesion.any():
                assert abs(float((batch["x0"][b, 0][lesion] - shifts[b, 0][lesion]).mean())) < 1.0 / 16
    assert shifts.abs().max() > 0.2 and torch.all(shifts[~masks.bool().any(dim=1, keepdim=True)] == 0)
    train_tiny(tmp_path / "offset", 1, "--level-offset")
    sampler = LesionSampler.load(tmp_path / "offset" / FINAL)
    assert sampler.level_offset and load_checkpoint(tmp_path / "offset" / FINAL).meta.extras["level_offset"]
    _, image_file, label_file = next(c for c in training_cases(dataset) if "P" in c[0])
    image, label = read_volume(image_file)[0], read_volume(label_file)[0]
    unit = covering_rois(image, label, labels.host, labels.lesions, sampler.roi_size)[0].intensity.to_unit
    lesion = np.isin(label, labels.lesions)

    def lesion_mean(bin_index: int) -> float:
        hist = np.zeros((2, 16), dtype=np.float32)
        hist[:, bin_index] = 1.0
        [(sampled, _)] = sampler.resynthesize_pairs([image], [label], np.random.default_rng(0),
                                                    SamplerConfig(1, 1, strided_steps=2), hist.ravel())
        assert np.array_equal(sampled[~lesion], image[~lesion])
        return float(unit(sampled)[lesion].mean())

    # an untrained network: with the level offset the lesions still take their condition's level (bright minus
    # dark condition: 1.875 before clipping to [-1, 1]), without it they do not
    offset_response = lesion_mean(15) - lesion_mean(0)
    sampler.level_offset = False
    assert offset_response > 0.75 and offset_response > lesion_mean(15) - lesion_mean(0) + 0.5
    train_main(["-d", str(LESION_ID), "--init", str(tmp_path / "offset" / FINAL), "--roi", *ROI, "--steps", "1",
                "--batch-size", "1", "--quiet", "-o", str(tmp_path / "tuned")])
    assert LesionSampler.load(tmp_path / "tuned" / FINAL).level_offset   # a fine-tune keeps it
