"""The learned lesion-mask generator: training pairs, controls, post-processing, checkpoints, resume, sampling, CLI.

Uses a real (tiny) phantom raw dataset and a real tiny Unet3D trained for a few steps: its masks are not realistic,
but every guarantee of the generator (inside the organ, nested, connected, classes as asked) must hold anyway.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from scipy import ndimage

from nnunet_lefusion.cli.train_masks import main as train_masks_main
from nnunet_lefusion.diffusion.sampler import SamplerConfig
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.masks import (MaskGenerator, check_lesion_map, fold_lesions, host_mask, inner_lesion_exposure,
                                   lesion_region, place_lesions, transmurality)
from nnunet_lefusion.masks.geometry import myocardial_coordinates
from nnunet_lefusion.masks.learned import (DepthTarget, LearnedMaskGenerator, MaskModelMeta, assemble_lesion_map,
                                          enclosed_part, mask_model_config, train_mask_model)
from nnunet_lefusion.masks.mask_data import (CONDITION_CHANNELS, ControlScale, LesionControl, MaskGrid, OrganFrame,
                                             generation_region, load_mask_pairs)
from nnunet_lefusion.masks.rule_based import CONNECTIVITY
from nnunet_lefusion.model import ModelConfig, load_checkpoint, save_checkpoint
from nnunet_lefusion.phantom import write_dataset
from nnunet_lefusion.training.loop import TrainConfig
from tests.mask_fixtures import EMIDEC, MI, MVO, phantom_cases, ring_case

TINY = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 1, "attn_dim_head": 8, "linear_attn": [False, True],
        "temporal_attn": [False, True], "init_kernel_size": 3, "resnet_groups": 4}
GRID = MaskGrid((10, 64, 64), pool=4)
FAST = SamplerConfig(jump_length=1, jump_n_sample=1, strided_steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _label_files(folder):
    return [(p.name.removesuffix(".nii.gz"), p) for p in sorted((folder / "labelsTr").glob("*.nii.gz"))]


def _read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing())[::-1]


def _train(pairs, out, steps, resume=False, checkpoint_every=2):
    config = TrainConfig(steps=steps, batch_size=2, checkpoint_every=checkpoint_every, lr=1e-3, progress=False)
    return train_mask_model(pairs, mask_model_config(2, TINY), EMIDEC, GRID, out, config, resume=resume)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A raw phantom dataset of 4 heart-FOV cases: 2 with lesions (Case_P002 with MVO), 2 normal (Case_N*)."""
    return write_dataset(996, 4, seed=7, raw_root=tmp_path_factory.mktemp("raw"), fov="heart", normal_fraction=0.5)


@pytest.fixture(scope="module")
def pairs(dataset):
    return load_mask_pairs(_label_files(dataset), EMIDEC, GRID, progress=False)


@pytest.fixture(scope="module")
def checkpoint(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("masks")
    return _train(pairs, out, steps=4).checkpoint


def _assert_valid(label_map, lesion_map, want_mvo=None):
    check_lesion_map(label_map, lesion_map, EMIDEC)
    lesion = lesion_map > 0
    assert lesion.any()
    assert not (lesion & ~host_mask(label_map, EMIDEC)).any(), "lesion voxels outside the organ"
    assert ndimage.label(lesion, structure=CONNECTIVITY)[1] == 1
    mvo = lesion_map == MVO
    assert (lesion_map[mvo] == MVO).all() and not (mvo & ~lesion).any()
    if want_mvo is not None:
        assert mvo.any() == want_mvo
    if mvo.any():
        assert ndimage.label(mvo, structure=CONNECTIVITY)[1] == 1
        assert (lesion_map == MI).any()


def test_control_covers_its_lesion_and_moves_to_other_organs():
    cases = phantom_cases(count=4)
    source, target = cases[0], cases[1]
    control = LesionControl.measure(source.label, EMIDEC, source.spacing)
    own = control.region(OrganFrame.of(source.label, EMIDEC, source.spacing), source.spacing)
    assert own[lesion_region(source.label, EMIDEC)].all()
    assert control.fractions[0] == pytest.approx((source.label >= MI).sum() / host_mask(source.label, EMIDEC).sum())
    assert control.fractions[1] == pytest.approx((source.label == MVO).sum() / host_mask(source.label, EMIDEC).sum())
    assert LesionControl.from_dict(json.loads(json.dumps(control.to_dict()))) == control

    frame = OrganFrame.of(target.label, EMIDEC, target.spacing)
    moved = control.region(frame, target.spacing, rotation=np.pi / 2)
    slices = np.flatnonzero(moved.any(axis=(1, 2)))
    assert set(slices) <= set(frame.slices)
    assert slices.size == max(1, round(control.slice_share * frame.slices.size))
    assert np.all(np.diff(slices) == 1)
    with pytest.raises(LeFusionError, match="no lesion"):
        LesionControl.measure(target.label, EMIDEC, target.spacing)


def test_pairs_hold_nested_masks_inside_the_organ_region(pairs):
    assert pairs.identifiers == ["Case_P001", "Case_P002"]
    assert pairs.masks.shape == (2, 2, *GRID.size) and pairs.maps.shape == (2, len(CONDITION_CHANNELS), *GRID.size)
    assert pairs.masks.min() >= -1 and pairs.masks.max() <= 1 and pairs.lesion_voxels_outside == 0
    assert (pairs.masks[:, 1] <= pairs.masks[:, 0]).all(), "MVO must lie inside MI"
    region = generation_region(pairs.maps[:, 0])
    assert not ((pairs.masks > -1) & ~region[:, None]).any(), "masks only where the organ is"

    scale = ControlScale.fit(pairs.controls)
    batch = pairs.make_batch(np.random.default_rng(5), 6, scale)
    again = pairs.make_batch(np.random.default_rng(5), 6, scale)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert batch["x0"].shape == (6, 2, *GRID.size) and batch["cond"].shape == (6, 3)
    flipped_region = generation_region(batch["maps"][:, :1])
    assert not ((batch["x0"] > -1) & ~flipped_region).any(), "flips must move masks and maps together"
    np.testing.assert_allclose(scale.apply(pairs.controls).mean(axis=0), 0, atol=1e-5)


def test_assembly_keeps_lesions_nested_connected_and_inside_the_organ():
    ring = ring_case()
    host = host_mask(ring.label_map, EMIDEC)
    rng = np.random.default_rng(0)
    for _ in range(10):
        scores = ndimage.gaussian_filter(rng.normal(size=(2, *host.shape)), (0, 0, 2, 2)) * 10
        _assert_valid(ring.label_map, assemble_lesion_map(scores, host, EMIDEC, (0.2, 0.05)), want_mvo=True)
        _assert_valid(ring.label_map, assemble_lesion_map(scores, host, EMIDEC, (0.2, 0.0)), want_mvo=False)

    wall = np.argwhere(host)[len(np.argwhere(host)) // 3]
    near = -np.linalg.norm(np.indices(host.shape).T - wall, axis=-1).T
    matched = assemble_lesion_map(np.stack([near, near]), host, EMIDEC, (0.2, 0.05), match_size=True)
    _assert_valid(ring.label_map, matched, want_mvo=True)
    assert (matched > 0).sum() == round(0.2 * host.sum()) and (matched == MVO).sum() == round(0.05 * host.sum())
    # MVO scores peak where MI's do, at the blob's centre, but MVO must not touch healthy myocardium in-plane
    assert inner_lesion_exposure(place_lesions(ring.label_map, matched, EMIDEC), EMIDEC) == 0.0

    # an inner lesion's scores scattered inside the outer one (as a network's are) still give its whole size
    # (the largest piece of its best-scoring voxels kept 3 to 8 of 26 here)
    scattered = np.stack([near, rng.normal(size=host.shape)])
    grown = assemble_lesion_map(scattered, host, EMIDEC, (0.3, 0.02), match_size=True)
    _assert_valid(ring.label_map, grown, want_mvo=True)
    assert (grown == MVO).sum() == round(0.02 * host.sum()) and (grown > 0).sum() == round(0.3 * host.sum())

    plain = transmurality(place_lesions(ring.label_map, matched, EMIDEC), EMIDEC)
    coords = myocardial_coordinates(ring.label_map, EMIDEC)
    for target in (0.6, 0.7):  # a blob through the whole wall, made less transmural at the same volumes
        calibrated = assemble_lesion_map(np.stack([near, near]), host, EMIDEC, (0.2, 0.05), match_size=True,
                                         depth=DepthTarget(coords, target))
        _assert_valid(ring.label_map, calibrated, want_mvo=True)
        assert [(calibrated == v).sum() for v in (MI, MVO)] == [(matched == v).sum() for v in (MI, MVO)]
        assert plain > 0.9 and abs(transmurality(place_lesions(ring.label_map, calibrated, EMIDEC), EMIDEC)
                                   - target) < 0.03
    not_too_deep = assemble_lesion_map(np.stack([near, near]), host, EMIDEC, (0.2, 0.05), match_size=True,
                                       depth=DepthTarget(coords, 1.0))
    assert np.array_equal(not_too_deep, matched)

    nothing = np.full((2, *host.shape), -1.0) + rng.uniform(0, 0.1, size=(2, *host.shape))
    fallback = assemble_lesion_map(nothing, host, EMIDEC, (0.1, 0.02))
    _assert_valid(ring.label_map, fallback, want_mvo=True)
    assert (fallback > 0).sum() <= round(0.1 * host.sum())

    everywhere = np.ones((2, *host.shape))
    everywhere[1] += rng.uniform(0, 0.1, size=host.shape)
    full = assemble_lesion_map(everywhere, host, EMIDEC, (0.3, 0.1))
    _assert_valid(ring.label_map, full, want_mvo=True)
    assert (full == MI).sum() == 1, "an MVO covering all of MI leaves its weakest voxel to MI"


def test_an_inner_lesion_goes_where_the_outer_one_encloses_it():
    host = np.zeros((1, 7, 9), dtype=bool)
    host[0, 1:6, 1:8] = True
    outer = np.zeros_like(host)
    outer[0, 1:6, 1:5] = True          # the left part of the organ: its voxels next to the rest are the rim
    core = enclosed_part(outer, host)
    assert core.sum() == 15 and not core[0, :, 4].any() and core[0, 1:6, 1:4].all()
    thin = np.zeros_like(host)
    thin[0, 3, 1:8] = True             # one row across the organ: no voxel is enclosed, so all of it may be used
    assert np.array_equal(enclosed_part(thin, host), thin)

    label_map = np.where(host, 2, 0).astype(np.uint8)
    label_map[outer] = MI
    label_map[0, 3, 3] = MVO
    assert inner_lesion_exposure(label_map, EMIDEC) == 0.0
    label_map[0, 3, 4] = MVO           # now 3 of its 10 neighbours (rows 2-4, columns 2-5) are healthy organ
    assert inner_lesion_exposure(label_map, EMIDEC) == pytest.approx(3 / 10)
    assert inner_lesion_exposure(np.where(label_map == MVO, MI, label_map), EMIDEC) is None


def test_checkpoint_round_trip_and_exact_resume(pairs, checkpoint, tmp_path):
    split = tmp_path / "split"
    _train(pairs, split, steps=2)
    resumed = _train(pairs, split, steps=4, resume=True)
    assert resumed.start_step == 2 and resumed.step == 4
    whole, parts = load_checkpoint(checkpoint), load_checkpoint(resumed.checkpoint)
    for name in ("model_state", "ema_state"):
        a, b = getattr(whole, name), getattr(parts, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f"resumed {name} differs from an uninterrupted run"

    generator = LearnedMaskGenerator.load(checkpoint)
    weights = generator.model.state_dict()
    assert all(torch.equal(weights[k], whole.ema_state[k]) for k in weights)
    assert generator.meta == MaskModelMeta(mask_model_config(2, TINY), EMIDEC, GRID, tuple(pairs.controls),
                                           ControlScale.fit(pairs.controls))
    with pytest.raises(LeFusionError, match="already holds a training run"):
        _train(pairs, split, steps=4)


def test_other_checkpoints_are_refused(tmp_path):
    path = tmp_path / "sampler.pt"
    save_checkpoint(path, ModelConfig.from_dict(TINY).build())
    with pytest.raises(LeFusionError, match="not a lesion-mask generator"):
        LearnedMaskGenerator.load(path)


def test_generated_masks_are_valid_on_normal_and_lesion_cases(checkpoint, dataset):
    generator = LearnedMaskGenerator.load(checkpoint, sampler=FAST, batch_size=3)
    assert isinstance(generator, MaskGenerator)
    cases = [_read(path) for _, path in _label_files(dataset)]
    label_maps, spacings = [c[0] for c in cases], [c[1] for c in cases]
    assert any(not (m >= MI).any() for m in label_maps), "the dataset must hold normal cases"
    for want, want_mvo in ((None, None), ((MVO,), True), ((MI,), False)):
        lesion_maps = generator.generate_many(label_maps, np.random.default_rng(1), want, spacings)
        for label_map, lesion_map in zip(label_maps, lesion_maps):
            _assert_valid(label_map, lesion_map, want_mvo)
            placed = place_lesions(label_map, lesion_map, EMIDEC)
            np.testing.assert_array_equal(placed >= MI, lesion_map > 0)

    one = generator.generate(label_maps[-1], np.random.default_rng(7), (MVO,), spacings[-1])
    np.testing.assert_array_equal(one, generator.generate(label_maps[-1], np.random.default_rng(7), (MVO,),
                                                          spacings[-1]))
    with pytest.raises(LeFusionError, match="want_classes"):
        generator.generate(label_maps[0], np.random.default_rng(0), (2,), spacings[0])
    with pytest.raises(LeFusionError, match="no host-organ voxels"):
        generator.generate(np.zeros_like(label_maps[0]), np.random.default_rng(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_on_cuda(checkpoint, dataset):
    generator = LearnedMaskGenerator.load(checkpoint, device="cuda", sampler=FAST)
    label_map, spacing = _read(_label_files(dataset)[-1][1])
    _assert_valid(label_map, generator.generate(label_map, np.random.default_rng(0), (MVO,), spacing), True)


def test_cli_trains_resumes_and_reports_errors(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(dataset.parent))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    args = ["-d", dataset.name, "-o", str(out), "--config", str(config), "--window", "10", "64", "64", "--pool", "4",
            "--batch-size", "2", "--checkpoint-every", "1", "--device", "cpu"]
    train_masks_main([*args, "--steps", "1"])
    train_masks_main([*args, "--steps", "2", "--resume"])
    assert "trained to step 2" in capsys.readouterr().out
    generator = LearnedMaskGenerator.load(out / "checkpoint_final.pt", sampler=FAST)
    assert generator.meta.grid == GRID and len(generator.meta.controls) == 2
    with pytest.raises(SystemExit) as error:
        train_masks_main([*args, "--steps", "2", "--window", "10", "64", "60"])
    assert error.value.code == 2 and "divisible" in capsys.readouterr().err


def test_shipped_generator_draws_valid_calibrated_lesions():
    """The shipped weights (pretrained/lesion_masks_phantom.pt, float16) load and put lesions on fresh phantom
    organs: inside, nested, connected, with the drawn control's volume."""
    shipped = Path(__file__).resolve().parents[1] / "pretrained" / "lesion_masks_phantom.pt"
    generator = LearnedMaskGenerator.load(shipped, sampler=FAST, batch_size=3)
    cases = phantom_cases(count=3, seed=11)
    hosts = [fold_lesions(c.label, EMIDEC) for c in cases]
    rng = np.random.default_rng(0)
    for want, want_mvo in (((MI,), False), ((MI, MVO), True)):
        maps = generator.generate_many(hosts, rng, want, [c.spacing for c in cases])
        for host, lesion_map in zip(hosts, maps):
            _assert_valid(host, lesion_map, want_mvo=want_mvo)
            fraction = (lesion_map > 0).sum() / host_mask(host, EMIDEC).sum()
            assert min(c.fractions[0] for c in generator.meta.controls) - 0.01 <= fraction \
                <= max(c.fractions[0] for c in generator.meta.controls) + 0.01
