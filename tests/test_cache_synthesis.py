"""Copy-paste synthesis into the cache, with the real nnU-Net preprocessor and real files."""
from __future__ import annotations

import pickle
from pathlib import Path

import blosc2
import SimpleITK as sitk
import numpy as np
import pytest

from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels
from nnunet_lefusion.masks import inner_lesion_exposure
from nnunet_lefusion.nnunet.cache import Manifest, default_cache_folder
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.preprocess import load_raw_case
from nnunet_lefusion.synthesis.base import RawCase
from nnunet_lefusion.synthesis.copypaste import CopyPasteSynthesizer
from tests.nnunet_helpers import error_lines, run_cli


@pytest.fixture(scope="module")
def cache_3d(phantom_dataset) -> tuple[DatasetContext, Path, Manifest]:
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "12", "--overwrite")
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    folder = default_cache_folder(ctx)
    return ctx, folder, Manifest.load(folder)


def test_cache_holds_preprocessed_variants_of_training_cases_only(cache_3d):
    ctx, folder, manifest = cache_3d
    train, val = ctx.split
    assert len(manifest.cases) == 12
    sources = {c["source"] for c in manifest.cases.values()}
    assert sources == set(train), "12 variants over 8 training cases must cover all of them"
    assert not sources & set(val)
    assert manifest.fold == 0 and manifest.configuration == "3d_fullres"
    assert not list(folder.glob(".tmp-*")), "no temporary file may survive"
    for syn_id, info in manifest.cases.items():
        real = ctx.data_folder / info["source"]
        data = blosc2.open(str(folder / f"{syn_id}.b2nd"), mode="r")[:]
        seg = blosc2.open(str(folder / f"{syn_id}_seg.b2nd"), mode="r")[:]
        real_data = blosc2.open(str(real) + ".b2nd", mode="r")[:]
        assert data.dtype == np.float32 and seg.dtype == np.int16
        assert data.shape == real_data.shape and seg.shape == (1, *data.shape[1:])
        props = pickle.loads((folder / f"{syn_id}.pkl").read_bytes())
        assert props["lefusion"]["source"] == info["source"] and props["lefusion"]["method"] == "copypaste"
        locations = props["class_locations"]
        for label in (3,):  # every copy-paste case carries an infarct: oversampling must be able to find it
            assert len(locations[label]) > 0
            z, y, x = np.asarray(locations[label])[:, 1:].T
            assert np.all(seg[0, z, y, x] == label)


def test_copypaste_changes_only_lesion_voxels_inside_the_organ(phantom_dataset):
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    labels = resolve_lesion_labels(ctx.dataset_json)
    cases = [load_raw_case(ctx, i) for i in sorted(ctx.split[0])]
    synthesizer = CopyPasteSynthesizer(cases, labels)
    rng = np.random.default_rng(0)
    for target in cases:
        kind = "newmask" if np.isin(target.seg, labels.lesions).any() else "normal"
        out = synthesizer.render_many([synthesizer.propose(target, kind, rng)], rng)[0].case
        changed = (out.seg != target.seg) | (out.image != target.image).any(axis=0, keepdims=True)
        new_lesion = np.isin(out.seg, labels.lesions)
        assert new_lesion.any()
        assert np.all(new_lesion[changed]), "only voxels that became lesion may change"
        assert np.all(np.isin(target.seg[changed], labels.host)), "lesions may only land in the host organ"


def _square_heart(size: int, spacing: float, lesion: int = 0) -> RawCase:
    """One slice of a square organ (label 2) filling the middle half of the grid, at ``spacing`` mm in-plane,
    with a ``lesion`` x ``lesion`` infarct (label 3) at its centre."""
    seg = np.zeros((1, 1, size, size), np.float32)
    seg[0, 0, size // 4:3 * size // 4, size // 4:3 * size // 4] = 2
    lo = size // 2 - lesion // 2
    seg[0, 0, lo:lo + lesion, lo:lo + lesion] = 3
    image = np.where(seg == 3, 300.0, np.where(seg > 0, 100.0, 0.0)).astype(np.float32)
    return RawCase(f"Case_{size}_{lesion}", image, seg, {"spacing": [10.0, spacing, spacing]})


def test_copypaste_keeps_the_lesion_size_in_mm_across_spacings():
    """A 8 x 8 mm lesion of a 1 mm donor pasted into the same heart sampled at 2 mm covers 4 x 4 voxels and is
    counted as kept whole (the kept fraction converts target voxels to donor voxels)."""
    labels = LesionLabels((3, 4), (2,), None)
    synthesizer = CopyPasteSynthesizer([_square_heart(40, 1.0, lesion=8)], labels, max_rotation_deg=0)
    target = _square_heart(20, 2.0)
    proposal = synthesizer.propose(target, "normal", np.random.default_rng(0))
    out = synthesizer.render_many([proposal], np.random.default_rng(0))[0]
    assert np.count_nonzero(out.case.seg == 3) == 16
    assert out.provenance["kept_fraction"] == pytest.approx(1.0)


def test_synthesize_appends_and_refuses_other_fold_cache(cache_3d, tmp_path):
    ctx, folder, manifest = cache_3d
    other = tmp_path / "cache"
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "2",
            "--cache", str(other))
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "-n", "3",
            "--cache", str(other), "--seed", "1")
    assert len(Manifest.load(other).cases) == 5
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "1", "-n", "1",
                  "--cache", str(other), check=False)
    assert res.returncode == 2 and len(error_lines(res)) == 1 and "fold 0" in res.stderr
    assert len(Manifest.load(other).cases) == 5, "a refused run must leave the cache as it was"


@pytest.mark.parametrize("args, message", [
    (["-d", "977", "-n", "1"], "not found"),
    (["-d", "990", "-c", "3d_lowres", "-n", "1"], "configuration"),
    (["-d", "990", "-n", "1", "--lesion-labels", "7"], "label 7"),
    (["-d", "990", "-n", "-1"], ">= 1"),
])
def test_synthesize_bad_input_is_one_error_line(phantom_dataset, args, message):
    res = run_cli("nnUNetv2_lefusion_synthesize", *args, check=False)
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_dataset_without_lesions_is_refused(nnunet_dirs):
    run_cli("nnUNetv2_lefusion_phantom", "-d", "991", "-n", "5", "--fov", "heart", "--normal-fraction", "1")
    run_cli("nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "2", "-npfp", "2")
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "991", "-n", "2", check=False)
    assert res.returncode == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "no training case" in lines[0], res.stderr


def test_plan_puts_lesions_on_normal_cases_and_raises_the_rare_class(phantom_dataset, tmp_path):
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    labels = resolve_lesion_labels(ctx.dataset_json)
    normal = {c.identifier for c in map(lambda i: load_raw_case(ctx, i), ctx.split[0])
              if not np.isin(c.seg, labels.lesions).any()}
    res = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-n", "8", "--mix", "newmask=0.5,normal=0.5",
                  "--target-share", "4=0.9", "--cache", str(tmp_path / "plan"))
    manifest = Manifest.load(tmp_path / "plan")
    kinds = [c["kind"] for c in manifest.cases.values()]
    assert kinds.count("normal") == 4 and kinds.count("newmask") == 4
    assert all((c["source"] in normal) == (c["kind"] == "normal") for c in manifest.cases.values())
    real, synthetic = manifest.real_lesion_voxels, manifest.lesion_voxel_totals()
    assert synthetic["4"] / sum(synthetic.values()) > real["4"] / sum(real.values())
    # below its (here unreachable) target, label 4 is asked of every pasted lesion; the shortfall is said
    assert all(c["lesion_voxels"].get("4", 0) > 0 for c in manifest.cases.values())
    assert "lesion voxels, synthetic" in res.stdout and "short of its target share 90%" in res.stdout


def test_copypaste_target_share_alone_keeps_lesions_and_nesting_in_the_preprocessed_grid(phantom_dataset, tmp_path):
    """``--target-share`` without ``--mix`` makes copy-paste's kinds. In the grid nnU-Net trains on, no lesion
    voxel of a source case changes class, and pasted no-reflow borders healthy organ no more than on real cases."""
    ctx = DatasetContext(phantom_dataset, "3d_fullres", 0)
    labels = resolve_lesion_labels(ctx.dataset_json)
    cache = tmp_path / "share"
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-n", "8", "--target-share", "4=0.3", "--cache", str(cache))
    manifest = Manifest.load(cache)
    assert {c["kind"] for c in manifest.cases.values()} == {"newmask", "normal"}
    real = {i: blosc2.open(str(ctx.data_folder / f"{i}_seg.b2nd"), mode="r")[:][0] for i in manifest.training_cases}
    real_exposure = [e for e in (inner_lesion_exposure(s, labels) for s in real.values()) if e is not None]
    exposure = []
    for identifier, info in manifest.cases.items():
        seg = blosc2.open(str(cache / f"{identifier}_seg.b2nd"), mode="r")[:][0]
        source = real[info["source"]]
        for label in labels.lesions:
            assert not ((source == label) & np.isin(seg, labels.lesions) & (seg != label)).any()
        exposure.append(inner_lesion_exposure(seg, labels))
    exposure = [e for e in exposure if e is not None]
    assert real_exposure and len(exposure) >= 6
    assert np.median(exposure) <= np.median(real_exposure) + 0.01 and max(exposure) <= max(real_exposure) + 0.03


def test_preview_and_nifti_export_of_an_existing_cache(cache_3d, tmp_path):
    ctx, folder, manifest = cache_3d
    before = sorted(p.stat().st_mtime_ns for p in folder.iterdir())
    done = run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "3d_fullres", "-f", "0", "--preview",
                   str(tmp_path / "preview"), "--preview-cases", "3", "--export-raw", str(tmp_path / "nii"))
    assert "3 preview pictures" in done.stdout
    pictures = sorted((tmp_path / "preview").iterdir())
    assert [p.name for p in pictures] == [f"{i}.png" for i in sorted(manifest.cases)[:3]]
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5_000 for p in pictures)
    exported = sorted(p.name for p in (tmp_path / "nii").iterdir())
    assert exported == sorted([f"{i}.nii.gz" for i in manifest.cases] + [f"{i}_0000.nii.gz" for i in manifest.cases])
    some = sorted(manifest.cases)[0]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nii" / f"{some}.nii.gz")))
    stored = blosc2.open(str(folder / f"{some}_seg.b2nd"), mode="r")[:]
    assert np.array_equal(label, stored[0])
    assert sitk.ReadImage(str(tmp_path / "nii" / f"{some}_0000.nii.gz")).GetSpacing() == pytest.approx(
        ctx.configuration_manager.spacing[::-1], rel=1e-6)
    assert sorted(p.stat().st_mtime_ns for p in folder.iterdir()) == before, "looking must not change the cache"


def test_nifti_export_of_a_2d_cache_keeps_each_case_slice_spacing(phantom_dataset, nnunet_dirs, tmp_path):
    """A 2d configuration's spacing is in-plane only: the exported volume takes its slice spacing from its case."""
    cache, out = tmp_path / "cache_2d", tmp_path / "nii_2d"
    run_cli("nnUNetv2_lefusion_synthesize", "-d", "990", "-c", "2d", "-f", "0", "-n", "1", "--cache", str(cache),
            "--export-raw", str(out))
    (identifier, info), = Manifest.load(cache).cases.items()
    raw = Path(nnunet_dirs["nnUNet_raw"]) / phantom_dataset / "labelsTr" / f"{info['source']}.nii.gz"
    in_plane = DatasetContext(phantom_dataset, "2d", 0).configuration_manager.spacing
    exported = sitk.ReadImage(str(out / f"{identifier}_0000.nii.gz")).GetSpacing()
    assert exported == pytest.approx((*in_plane[::-1], sitk.ReadImage(str(raw)).GetSpacing()[2]), rel=1e-6)
