"""The Emidec release (one folder per case, ``Images/`` and ``Contours/``) as an nnU-Net raw dataset.

Release layout (``emidec-dataset-1.0.1``): ``Case_P001/Images/Case_P001.nii.gz`` and
``Case_P001/Contours/Case_P001.nii.gz``; ``P`` cases are pathological, ``N`` cases normal. Labels: 0 background,
1 LV cavity, 2 myocardium, 3 infarct, 4 no-reflow. Every case is checked before anything is written (contours for
every image, one grid, known label values); the files are then copied unchanged, so arrays and headers (spacing,
origin, direction) stay exactly those of the release, into a folder beside the target that is renamed into place.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError

NAME = "Emidec"
FILE_ENDING = ".nii.gz"
CASE_NAME = re.compile(r"Case_[NP]\d+")
# names the plugin reads (labels.resolve_lesion_labels): infarction/no_reflow are lesions, cavity the LV cavity
LABELS = {"background": 0, "cavity": 1, "myocardium": 2, "infarction": 3, "no_reflow": 4}
CHANNEL = "LGE"


@dataclass(frozen=True)
class EmidecCase:
    """One checked case of the release: its image and contour files, and whether it is pathological."""

    name: str
    image: Path
    contours: Path

    @property
    def pathological(self) -> bool:
        return self.name.startswith("Case_P")


def find_cases(source: str | Path) -> list[Path]:
    """The case folders (``Case_N...`` / ``Case_P...``) of a release folder, by name; ``LeFusionError`` if none."""
    source = Path(source)
    if not source.is_dir():
        raise LeFusionError(f"{source} is not a folder: give the Emidec release folder (it holds Case_P001/, ...)")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and CASE_NAME.fullmatch(p.name))
    if not folders:
        raise LeFusionError(f"{source} holds no case folder (Case_N012/, Case_P001/, ...): give the Emidec release "
                            f"folder, e.g. emidec-dataset-1.0.1")
    return folders


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise LeFusionError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from None


def check_case(folder: Path) -> EmidecCase:
    """The case of ``folder`` once its files are checked: an image and its contours (both ``<case>.nii.gz``), 3D,
    on one grid (size, spacing, origin and direction agree as nnU-Net checks them, ``np.allclose``), finite image
    values and integer label values among Emidec's 0-4; ``LeFusionError`` naming the case otherwise."""
    name = folder.name
    image_path, contour_path = (folder / sub / f"{name}{FILE_ENDING}" for sub in ("Images", "Contours"))
    for what, path in (("image", image_path), ("contours", contour_path)):
        if not path.is_file():
            test_set = " (the test set has no contours: convert the training release)" if what == "contours" else ""
            raise LeFusionError(f"{name}: no {what} file {path}{test_set}")
    image, contours = _read(image_path), _read(contour_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LeFusionError(f"{name}: the image {image_path} is not a 3D single-channel volume")
    for what, a, b in (("size", image.GetSize(), contours.GetSize()),
                       ("spacing", image.GetSpacing(), contours.GetSpacing()),
                       ("origin", image.GetOrigin(), contours.GetOrigin()),
                       ("direction", image.GetDirection(), contours.GetDirection())):
        if len(a) != len(b) or not np.allclose(a, b):
            raise LeFusionError(f"{name}: image and contours differ in {what} ({tuple(map(float, a))} vs "
                                f"{tuple(map(float, b))})")
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise LeFusionError(f"{name}: the image {image_path} holds NaN or infinite values")
    values = np.unique(sitk.GetArrayViewFromImage(contours))
    unknown = [v for v in values.tolist() if v not in LABELS.values()]
    if unknown:
        raise LeFusionError(f"{name}: the contours hold label values {unknown[:5]} that Emidec does not have "
                            f"(0 background, 1 cavity, 2 myocardium, 3 infarct, 4 no-reflow)")
    return EmidecCase(name, image_path, contour_path)


def dataset_folder(dataset_id: int, raw_root: str | Path) -> Path:
    if not 1 <= dataset_id <= 999:
        raise LeFusionError(f"dataset id must be between 1 and 999, got {dataset_id}")
    return Path(raw_root) / f"Dataset{dataset_id:03d}_{NAME}"


def existing_datasets(dataset_id: int, raw_root: str | Path) -> list[Path]:
    """Raw datasets that already use ``dataset_id`` (nnU-Net finds a dataset by its id alone)."""
    return sorted(p for p in Path(raw_root).glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())


def _write(cases: list[EmidecCase], folder: Path, name: str, source: Path) -> None:
    """imagesTr/labelsTr (copies of the release files) and dataset.json of dataset ``name`` in ``folder``."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in tqdm(cases, desc=f"writing {name}", unit="case"):
        shutil.copyfile(case.image, folder / "imagesTr" / f"{case.name}_0000{FILE_ENDING}")
        shutil.copyfile(case.contours, folder / "labelsTr" / f"{case.name}{FILE_ENDING}")
    pathological = sum(case.pathological for case in cases)
    generate_dataset_json(
        str(folder), channel_names={0: CHANNEL}, labels=LABELS, num_training_cases=len(cases),
        file_ending=FILE_ENDING, dataset_name=name,
        description="Emidec DE-MRI training cases (myocardial infarction) in their release geometry",
        reference="https://emidec.com/dataset", license="CC BY-NC-SA 4.0",
        citation="Lalande et al., Emidec: a database usable for the automatic evaluation of myocardial infarction "
                 "from delayed-enhancement cardiac MRI, Data 5(4):89, 2020",
        converted_by="nnUNetv2_lefusion_convert_emidec",
        lefusion_emidec={"source": str(source.resolve()), "pathological": pathological,
                         "normal": len(cases) - pathological})


def convert_emidec(source: str | Path, dataset_id: int, raw_root: str | Path, overwrite: bool = False) -> Path:
    """Write ``Dataset{id:03d}_Emidec`` under ``raw_root`` from the release in ``source``; return its folder.

    Refused (``LeFusionError``, nothing written) for a bad case, an empty release, or an id already used by a raw
    dataset unless ``overwrite`` (which replaces it once the new one is complete).
    """
    target = dataset_folder(dataset_id, raw_root)
    existing = existing_datasets(dataset_id, raw_root)
    if existing and not overwrite:
        raise LeFusionError(f"dataset id {dataset_id} is already used by {existing[0]}; pass --overwrite to replace it")
    folders = find_cases(source)
    cases = [check_case(folder) for folder in tqdm(folders, desc="checking Emidec cases", unit="case")]
    Path(raw_root).mkdir(parents=True, exist_ok=True)
    aside = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    old = [path.with_name(f".{path.name}.{os.getpid()}.old") for path in existing]
    try:
        _write(cases, aside, target.name, Path(source))
        for path, moved in zip(existing, old):
            path.rename(moved)
        aside.rename(target)
    except OSError as exc:
        for path, moved in zip(existing, old):  # put a replaced dataset back
            if moved.exists() and not path.exists():
                moved.rename(path)
        raise LeFusionError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    for moved in old:
        shutil.rmtree(moved)
    return target
