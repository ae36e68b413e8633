"""The DE-MRI phantom: anatomy, labels, intensities, determinism, the written nnU-Net raw dataset and its CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_lefusion.cli.phantom import main as phantom_main
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.phantom import LABELS, MAX_INTENSITY, case_plan, case_rng, generate_case, write_dataset
from nnunet_lefusion.realism import (EMIDEC_CROP, EMIDEC_LESION_EXTENT, TARGETS, case_statistics, crop_statistics,
                                     heart_crop, lesion_extent)
from tests.nnunet_helpers import error_lines, one_error_line, run_cli

FOUR = ndimage.generate_binary_structure(2, 1)   # in-plane 4-neighbourhood


@pytest.fixture(scope="module")
def cases():
    """(case, pathological, fov): 12 heart-FOV cases (8 pathological) and 3 thorax cases (2 pathological)."""
    out = [(generate_case(np.random.default_rng(100 + i), i % 3 != 2, "heart"), i % 3 != 2, "heart")
           for i in range(12)]
    out += [(generate_case(np.random.default_rng(200 + i), i != 1, "thorax"), i != 1, "thorax") for i in range(3)]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return write_dataset(990, 6, seed=7, raw_root=root, fov="heart")


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Voxels 4-adjacent (in-plane) to ``mask`` but not in it."""
    return ndimage.binary_dilation(mask, FOUR) & ~mask


def test_labels_are_nested_like_emidec(cases):
    for case, pathological, _ in cases:
        assert set(np.unique(case.label)) == ({0, 1, 2, 3} | ({4} if (case.label == 4).any() else set())
                                              if pathological else {0, 1, 2})
        for lab in case.label:
            heart = lab > 0
            if not heart.any():
                continue
            # one heart, no background enclosed: lesions meet background only at the epicardial border
            assert ndimage.label(heart)[1] == 1
            assert np.array_equal(ndimage.binary_fill_holes(heart), heart)
            assert not (_neighbours(lab == 1) & (lab == 0)).any(), "cavity touches background"
            assert set(np.unique(lab[_neighbours(lab == 4)])) <= {1, 3}, "no-reflow outside the infarct core"
            components, count = ndimage.label(lab == 3)
            for k in range(1, count + 1):
                near = set(np.unique(lab[_neighbours(components == k)]))
                assert near & {1, 4} or not (lab == 1).any(), "infarct not subendocardial"
                assert 2 in near or 0 in near


def test_geometry_is_emidec_like(cases):
    for case, _, fov in cases:
        nz, ny, nx = case.image.shape
        assert case.label.shape == case.image.shape
        assert 6 <= nz <= 10
        low, high = (64, 80) if fov == "heart" else (140, 260)
        assert low <= ny <= high and low <= nx <= high
        dz, dy, dx = case.spacing
        assert dy == dx and 1.3 <= dx <= 1.6 and 10.0 <= dz <= 13.0
        areas = (case.label > 0).sum(axis=(1, 2))
        assert (areas > 0).sum() >= nz - 2
        diameter = 2 * np.sqrt(areas.max() / np.pi)
        assert 32 <= diameter <= 52, diameter
        labelled = np.flatnonzero(areas)
        assert areas[labelled[-1]] < 0.6 * areas.max(), "no taper towards the apex"
        heart_share = (case.label > 0).sum() / case.label.size
        assert heart_share < 0.05 if fov == "thorax" else heart_share > 0.07


def test_intensities_are_12_bit_with_emidec_contrast(cases):
    stats = [case_statistics(case.image, case.label, case.spacing, LesionLabels.emidec()) for case, _, _ in cases]
    for target in TARGETS:
        assert target.holds_for([row[target.key] for row in stats]), target
    for case, _, fov in cases:
        img, lab = case.image, case.label
        assert img.dtype == np.float32 and lab.dtype == np.uint8
        assert img.min() >= 0 and img.max() <= MAX_INTENSITY and np.array_equal(img, np.rint(img))
        myocardium = np.median(img[lab == 2])
        if fov == "thorax":
            assert (img < 0.25 * myocardium).mean() > 0.2, "no air around the body"
    # epicardial fat in places, as on Emidec (99th percentile of the 2-voxel ring: median 1.34 x myocardium)
    rims = [np.percentile(c.image[ndimage.binary_dilation(c.label > 0, iterations=2) & (c.label == 0)], 99)
            / np.median(c.image[c.label == 2]) for c, _, _ in cases]
    assert 1.25 < np.median(rims) < 1.6, "no bright epicardial fat"


def test_heart_crop_looks_like_emidec(cases):
    """What a network sees, measured like on 66 real Emidec crops (``EMIDEC_CROP``): healthy myocardium is one of
    the darker tissues (median near the 36th percentile of the crop, not above the middle), little of the crop is
    dark lung (5th percentile near 0.87 x myocardium), blood pool brighter than most of the crop, and the contrasts
    of blood pool, infarct and no-reflow to healthy myocardium within 0.4 of Emidec's."""
    rows = [crop_statistics(c.image[heart_crop(c.label)], c.label[heart_crop(c.label)]) for c, _, _ in cases]

    def median(key: str) -> float:
        return float(np.median([row[key] for row in rows if key in row]))

    assert 28 < median("pct_myocardium") < 45
    assert median("p5/myo") > 0.75 and 1.1 < median("p95/myo") < 1.4
    assert median("pct_cavity") > median("pct_myocardium") + 20
    for key in ("contrast_cavity", "contrast_infarct", "contrast_no_reflow"):
        assert abs(median(key) - EMIDEC_CROP[key]) <= 0.4, (key, median(key))


def test_infarcts_are_patchy_with_soft_borders(cases):
    """Not uniform blocks: the infarct varies beyond the noise and its edge is wider than a voxel."""
    stats = [case_statistics(case.image, case.label, case.spacing, LesionLabels.emidec())
             for case, pathological, _ in cases if pathological]
    assert np.nanmedian([row["heterogeneity"] for row in stats]) > 1.2
    assert np.nanmedian([row["border_mm"] for row in stats]) > 1.5 * cases[0][0].spacing[2]


def test_lesions_take_as_much_of_the_wall_as_emidec_lesions(cases):
    """Lesions sized like real ones (``EMIDEC_LESION_EXTENT``: a fifth of the wall over most of its slices at the
    median, no-reflow about 1.5 % where present): smaller ones went unlearnt at the sim-to-real budget."""
    rows = [lesion_extent(case.label) for case, pathological, _ in cases if pathological]
    tolerance = {"lesion/wall": 1.25, "lesion_slices": 1.25, "no_reflow/wall": 2.0}   # few cases have no-reflow
    for key, real in EMIDEC_LESION_EXTENT.items():
        phantom = np.median([row[key] for row in rows if key in row])
        assert real / tolerance[key] < phantom < real * tolerance[key], (key, phantom, real)


def test_slices_are_shifted_like_separate_breath_holds(cases):
    """The heart's centre moves in-plane from slice to slice by about a millimetre, not along a smooth line."""
    jumps = []
    for case, _, _ in cases:
        centres = np.array([ndimage.center_of_mass(lab == 1) for lab in case.label if (lab == 1).sum() > 50])
        steps = np.diff(centres, axis=0) * case.spacing[2]
        jumps += list(np.linalg.norm(np.diff(steps, axis=0), axis=1))   # change of direction between slices
    assert 0.5 < np.median(jumps) < 4.0


def test_mvo_is_rare_and_pathology_split_is_emidec_like(cases):
    counts = sum(np.bincount(c.label.ravel(), minlength=5) for c, _, _ in cases)
    assert 0 < counts[4] < 0.01 * counts[1:].sum()
    with_mvo = sum((c.label == 4).any() for c, p, _ in cases if p)
    assert 0 < with_mvo < sum(p for _, p, _ in cases)
    plan = case_plan(100)
    assert [n for n, _ in plan][:2] == ["Case_P001", "Case_P002"] and plan[-1] == ("Case_N033", False)
    assert sum(p for _, p in plan) == 67 and len({n for n, _ in plan}) == 100
    assert sum(p for _, p in case_plan(12)) == 8 and not any(p for _, p in case_plan(5, 1.0))


def test_same_seed_same_case_other_seed_different():
    a, b = (generate_case(np.random.default_rng(42), True, "heart") for _ in range(2))
    c = generate_case(np.random.default_rng(43), True, "heart")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.spacing == b.spacing
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    with pytest.raises(LeFusionError, match="field of view"):
        generate_case(np.random.default_rng(0), True, "chest")


def test_written_dataset_reads_back(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == LABELS == {"background": 0, "cavity": 1, "myocardium": 2, "infarction": 3,
                                        "no_reflow": 4}
    assert (meta["channel_names"], meta["file_ending"], meta["numTraining"]) == ({"0": "LGE"}, ".nii.gz", 6)
    assert dataset.name == "Dataset990_LeFusionPhantom"
    assert sorted(os.listdir(dataset / "imagesTr")) == sorted(f"{n}_0000.nii.gz" for n, _ in case_plan(6))
    assert sorted(os.listdir(dataset / "labelsTr")) == sorted(f"{n}.nii.gz" for n, _ in case_plan(6))
    for name, pathological in case_plan(6):
        image = sitk.ReadImage(str(dataset / "imagesTr" / f"{name}_0000.nii.gz"))
        label = sitk.ReadImage(str(dataset / "labelsTr" / f"{name}.nii.gz"))
        expected = generate_case(case_rng(7, name), pathological, "heart")
        assert image.GetSpacing() == label.GetSpacing() == expected.spacing[::-1]
        assert image.GetOrigin() == label.GetOrigin() and image.GetDirection() == label.GetDirection()
        assert label.GetPixelID() == sitk.sitkUInt8 and image.GetPixelID() == sitk.sitkInt16
        assert np.array_equal(sitk.GetArrayFromImage(image), expected.image)
        assert np.array_equal(sitk.GetArrayFromImage(label), expected.label)


def test_existing_dataset_id_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "Dataset990_Other").mkdir()
    with pytest.raises(LeFusionError, match="already used"):
        write_dataset(990, 2, seed=0, raw_root=tmp_path, fov="heart")
    folder = write_dataset(990, 2, seed=0, raw_root=tmp_path, fov="heart", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    assert not [p for p in folder.rglob(".*")], "temporary files left behind"


@pytest.mark.parametrize("args, message", [
    (["-d", "990", "-n", "1"], "at least 2 cases"),
    (["-d", "990", "--normal-fraction", "1.5"], "normal fraction"),
    (["-d", "990", "--name", "bad name"], "dataset name"),
    (["-d", "1000"], "between 1 and 999"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    assert message in one_error_line(capsys, phantom_main, [*args, "-o", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_cli_writes_into_nnunet_raw_and_refuses_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert phantom_main(["-d", "991", "-n", "2", "--fov", "heart", "--name", "Tiny", "--seed", "3"]) == 0
    assert (tmp_path / "Dataset991_Tiny" / "dataset.json").is_file()
    res = run_cli("nnUNetv2_lefusion_phantom", "-d", "991", "-n", "2", "--fov", "heart", check=False)
    assert res.returncode == 2 and "--overwrite" in error_lines(res)[-1] and len(error_lines(res)) == 1
    monkeypatch.delenv("nnUNet_raw")
    res = run_cli("nnUNetv2_lefusion_phantom", "-d", "992", check=False)
    assert res.returncode == 2 and error_lines(res) == [
        "nnUNetv2_lefusion_phantom: error: nnUNet_raw is not set; export it or pass -o/--output-root"]
