"""nnUNetv2_lefusion_convert_emidec: phantom cases in the Emidec release layout become an nnU-Net raw dataset with
identical arrays and headers; bad layouts are refused in one line before anything is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_lefusion.cli.convert_emidec import main as convert_main
from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels
from nnunet_lefusion.phantom import case_rng, generate_case
from tests.nnunet_helpers import one_error_line

CASES = {"Case_N012": False, "Case_P003": True, "Case_P017": True}
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # a rotated grid, as Emidec scanners write them


def _image(array: np.ndarray, spacing, origin) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    return image


def write_release(root: Path) -> Path:
    """Phantom cases written as the Emidec release writes its own: float64 images, uint8 contours, per-case grids,
    and a clinical text file beside the folders."""
    root.mkdir()
    for k, (name, pathological) in enumerate(CASES.items()):
        case = generate_case(case_rng(3, name), pathological, "heart")
        spacing, origin = tuple(float(v) for v in case.spacing[::-1]), (-120.5 + k, 33.25, -7.0 * k)
        for sub, array in (("Images", case.image.astype(np.float64)), ("Contours", case.label)):
            (root / name / sub).mkdir(parents=True)
            sitk.WriteImage(_image(array, spacing, origin), str(root / name / sub / f"{name}.nii.gz"), True)
        (root / f"{name.replace('_', ' ')}.txt").write_text("Gap between slices : 10 mm\n")
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("emidec") / "emidec-dataset-1.0.1")


@pytest.fixture
def release(pristine, tmp_path) -> Path:
    """A fresh copy of the release, for a test to convert or break."""
    return Path(shutil.copytree(pristine, tmp_path / pristine.name))


def _header(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetPixelID()


def test_release_round_trip_keeps_arrays_and_headers(release, tmp_path, capsys):
    raw = tmp_path / "raw"
    convert_main([str(release), "-d", "115", "-o", str(raw)])
    assert "2 pathological and 1 normal cases" in capsys.readouterr().out
    folder = raw / "Dataset115_Emidec"
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset115_Emidec"], "nothing left aside"
    for name in CASES:
        for source, converted in ((release / name / "Images" / f"{name}.nii.gz", folder / "imagesTr" /
                                   f"{name}_0000.nii.gz"),
                                  (release / name / "Contours" / f"{name}.nii.gz", folder / "labelsTr" /
                                   f"{name}.nii.gz")):
            a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(converted))
            assert _header(a) == _header(b)
            assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{n}_0000.nii.gz" for n in sorted(CASES)]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "LGE"}
    assert meta["lefusion_emidec"]["pathological"] == 2 and meta["lefusion_emidec"]["normal"] == 1
    assert resolve_lesion_labels(meta) == LesionLabels.emidec(), "the plugin reads Emidec's roles from the names"

    # nnU-Net's own integrity check accepts the dataset
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(folder), num_processes=1)

    # an existing id is refused, then replaced with --overwrite
    (raw / "Dataset115_Other").mkdir()
    line = one_error_line(capsys, convert_main, [str(release), "-d", "115", "-o", str(raw)])
    assert "already used" in line and "--overwrite" in line
    convert_main([str(release), "-d", "115", "-o", str(raw), "--overwrite"])
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset115_Emidec"]


def _break(release: Path, how: str) -> None:
    p003 = release / "Case_P003"
    contours = p003 / "Contours" / "Case_P003.nii.gz"
    label = sitk.ReadImage(str(contours))
    if how == "no contours":
        contours.unlink()
    elif how == "shape":
        sitk.WriteImage(label[:, :-1, :], str(contours), True)
    elif how == "origin":
        label.SetOrigin((0.0, 0.0, 0.0))
        sitk.WriteImage(label, str(contours), True)
    elif how == "label value":
        array = sitk.GetArrayFromImage(label)
        array[0, 0, 0] = 7
        broken = sitk.GetImageFromArray(array)
        broken.CopyInformation(label)
        sitk.WriteImage(broken, str(contours), True)
    elif how == "empty":
        for case in CASES:
            (release / case).rename(release.parent / f"moved_{case}")


@pytest.mark.parametrize("how, message", [("no contours", "Case_P003: no contours file"),
                                          ("shape", "Case_P003: image and contours differ in size"),
                                          ("origin", "Case_P003: image and contours differ in origin"),
                                          ("label value", "label values [7]"),
                                          ("empty", "holds no case folder")])
def test_bad_layouts_are_refused_before_anything_is_written(release, tmp_path, capsys, how, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    _break(release, how)
    line = one_error_line(capsys, convert_main, [str(release), "-d", "115", "-o", str(raw)])
    assert message in line, line
    assert list(raw.iterdir()) == [], "nothing written"
