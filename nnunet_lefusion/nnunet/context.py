"""Resolve an nnU-Net dataset/configuration/fold into everything the plugin needs (paths, plans, split)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence, TypeVar

from nnunet_lefusion.errors import LeFusionError

T = TypeVar("T")


def read_json(path: Path) -> dict:
    """A JSON file (dataset.json, plans); ``LeFusionError`` if it is missing, unreadable or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise LeFusionError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # invalid JSON, or not text
        raise LeFusionError(f"{path} is not valid JSON ({exc})") from None


def env_folder(name: str) -> Path:
    """The folder in environment variable ``name`` (nnUNet_raw / nnUNet_preprocessed / nnUNet_results)."""
    value = os.environ.get(name)
    if not value:
        raise LeFusionError(f"environment variable {name} is not set (see nnU-Net's documentation/setting_up_paths.md)")
    return Path(value)


def dataset_name(dataset: str | int) -> str:
    """``990`` / ``"990"`` / ``"Dataset990_X"`` -> ``"Dataset990_X"``, looked up like nnU-Net does."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError) as exc:
        raise LeFusionError(f"dataset {dataset!r} not found in nnUNet_raw/nnUNet_preprocessed/nnUNet_results "
                            f"({str(exc).splitlines()[0]})") from None


def parse_fold(fold: str | int) -> int | str:
    """nnU-Net's fold argument: an integer >= 0 or ``"all"``."""
    if str(fold) == "all":
        return "all"
    try:
        number = int(fold)
    except ValueError:
        number = -1
    if number < 0:
        raise LeFusionError(f"fold must be an integer >= 0 or 'all', got {fold!r}")
    return number


def check_parts(num_parts: int, part_id: int) -> None:
    """``LeFusionError`` unless ``part_id`` is one of ``num_parts`` parts (``-num_parts`` / ``-part_id``)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise LeFusionError(f"need -num_parts >= 1 and 0 <= -part_id < -num_parts, got {num_parts} and {part_id}")


def part_of(items: Sequence[T], num_parts: int, part_id: int) -> list[T]:
    """Part ``part_id`` of ``num_parts`` of ``items`` as ``nnUNetv2_predict`` splits its cases: every
    ``num_parts``-th item from ``part_id`` on."""
    check_parts(num_parts, part_id)
    return list(items[part_id::num_parts])


@dataclass
class DatasetContext:
    """One dataset + plans + configuration (+ fold): paths, plans objects and the training split."""

    dataset: str
    configuration: str
    fold: int | str = 0
    plans_identifier: str = "nnUNetPlans"

    def __post_init__(self) -> None:
        self.dataset = dataset_name(self.dataset)
        self.fold = parse_fold(self.fold)
        if not self.plans_file.is_file():
            raise LeFusionError(f"no plans {self.plans_file}; run nnUNetv2_plan_and_preprocess for {self.dataset} "
                                "first")
        if self.configuration not in self.plans_manager.available_configurations:
            raise LeFusionError(f"configuration {self.configuration!r} is not in {self.plans_file.name} "
                                f"(available: {self.plans_manager.available_configurations})")
        if not self.data_folder.is_dir() or not any(self.data_folder.glob("*.pkl")):
            raise LeFusionError(f"{self.data_folder} has no preprocessed cases; run nnUNetv2_plan_and_preprocess "
                                f"-d {self.dataset} -c {self.configuration}")

    @property
    def raw_folder(self) -> Path:
        return env_folder("nnUNet_raw") / self.dataset

    @property
    def preprocessed_folder(self) -> Path:
        return env_folder("nnUNet_preprocessed") / self.dataset

    @property
    def plans_file(self) -> Path:
        return self.preprocessed_folder / f"{self.plans_identifier}.json"

    @cached_property
    def dataset_json(self) -> dict:
        return read_json(self.preprocessed_folder / "dataset.json")

    @cached_property
    def plans(self) -> dict:
        return read_json(self.plans_file)

    @cached_property
    def plans_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans)

    @cached_property
    def configuration_manager(self):
        return self.plans_manager.get_configuration(self.configuration)

    @cached_property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def data_folder(self) -> Path:
        return self.preprocessed_folder / self.configuration_manager.data_identifier

    @cached_property
    def split(self) -> tuple[list[str], list[str]]:
        """(training, validation) identifiers of the fold, by nnU-Net's own ``do_split`` (writes splits_final.json
        exactly as the first training would if it is missing)."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from nnunet_lefusion.nnunet.provenance import nnunet_split

        folder = str(self.data_folder)
        return nnunet_split(infer_dataset_class(folder).get_identifiers(folder), self.fold, self.preprocessed_folder)

    def check_single_stage(self) -> None:
        """``LeFusionError`` for a cascade stage: a synthetic case has no previous-stage segmentation."""
        previous = self.configuration_manager.previous_stage_name
        if previous is not None:
            raise LeFusionError(f"configuration {self.configuration} is a cascade stage (after {previous}); synthetic "
                                f"cases have no {previous} segmentation: use a single-stage configuration such as "
                                f"3d_fullres")

    @cached_property
    def label_hashes(self) -> dict[str, str]:
        """identifier -> content hash of the raw label file, for the fold's training and validation cases."""
        from nnunet_lefusion.nnunet.provenance import label_hash

        train, val = self.split
        missing = sorted(set(train + val) - set(self.raw_cases))
        if missing:
            raise LeFusionError(f"case(s) {', '.join(missing[:5])} of fold {self.fold} are not in the raw dataset "
                                f"{self.raw_folder}")
        return {k: label_hash(self.raw_cases[k]["label"]) for k in sorted(set(train + val))}

    def held_out_hashes(self) -> dict[str, str]:
        """Label hashes of the fold's validation cases that are not training cases (none for fold ``all``)."""
        train, val = self.split
        return {k: self.label_hashes[k] for k in sorted(set(val) - set(train))}

    def training_label_fingerprint(self) -> str:
        """One hash of the fold's training cases and their raw label files."""
        from nnunet_lefusion.nnunet.provenance import fingerprint

        return fingerprint({k: self.label_hashes[k] for k in self.split[0]})

    @cached_property
    def raw_cases(self) -> dict[str, dict]:
        """identifier -> {'images': [...], 'label': ...} of the raw training files."""
        if not self.raw_folder.is_dir():
            raise LeFusionError(f"raw dataset folder {self.raw_folder} is missing (nnUNet_raw)")
        return raw_training_files(self.raw_folder, raw_dataset_json(self.raw_folder))


def raw_training_files(raw_folder: Path, dataset_json: dict) -> dict[str, dict]:
    """identifier -> {'images': [...], 'label': ...} of a raw dataset's training cases, as nnU-Net lists them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    return get_filenames_of_train_images_and_targets(str(raw_folder), dataset_json)


def raw_dataset_json(raw_folder: Path) -> dict:
    """The ``dataset.json`` of a raw dataset folder; ``LeFusionError`` if it is not there."""
    if not (Path(raw_folder) / "dataset.json").is_file():
        raise LeFusionError(f"{raw_folder} has no dataset.json (is nnUNet_raw right?)")
    return read_json(Path(raw_folder) / "dataset.json")


def case_paths(files: dict[str, dict]) -> list[tuple[str, Path, Path]]:
    """(identifier, first-channel image, label) of raw training files (:func:`raw_training_files`), sorted."""
    return [(ident, Path(f["images"][0]), Path(f["label"])) for ident, f in sorted(files.items())]


def training_cases(raw_folder: Path) -> list[tuple[str, Path, Path]]:
    """(identifier, first-channel image, label) of every raw training case, sorted; ``LeFusionError`` if none."""
    files = raw_training_files(raw_folder, raw_dataset_json(raw_folder))
    if not files:
        raise LeFusionError(f"{raw_folder} has no training cases (imagesTr/labelsTr).")
    return case_paths(files)
