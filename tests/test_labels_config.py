"""Label roles from dataset.json and trainer settings from YAML + environment."""
from __future__ import annotations

import pytest

from dataclasses import FrozenInstanceError

from nnunet_lefusion.config import ENV_VARIABLES, TrainerSettings, load_settings, write_settings
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels

EMIDEC = {"labels": {"background": 0, "cavity": 1, "myocardium": 2, "infarction": 3, "no_reflow": 4}}


def test_emidec_roles_are_found_from_names():
    assert resolve_lesion_labels(EMIDEC) == LesionLabels.emidec()


BRATS = {"labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
         "regions_class_order": [1, 2, 3]}


def test_other_label_sets_work():
    liver = {"labels": {"background": 0, "liver": 1, "tumor": 2}}
    assert resolve_lesion_labels(liver) == LesionLabels((2,), (1,), None)
    assert resolve_lesion_labels(liver, lesions=[2], organ=[1]).host == (1, 2)
    # region-based datasets: the values inside the label lists are the ones that can be named
    assert resolve_lesion_labels(BRATS, lesions=[2, 3], organ=[1]) == LesionLabels((2, 3), (1,), None)


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset_json": {"labels": {"background": 0, "cavity": 1, "myocardium": 2}}}, "no lesion label"),
    ({"dataset_json": EMIDEC, "lesions": [9]}, "label 9"),
    ({"dataset_json": EMIDEC, "lesions": [3], "organ": [3]}, "overlap"),
    ({"dataset_json": {"labels": {"background": 0, "lesion": 1}}}, "no label is left for the organ"),
    ({"dataset_json": BRATS}, "defines regions"),
])
def test_bad_labels_raise(kwargs, message):
    with pytest.raises(LeFusionError, match=message):
        resolve_lesion_labels(**kwargs)


def test_settings_yaml_then_environment(tmp_path, monkeypatch):
    for var in ("LEFUSION_CONFIG", "LEFUSION_RATE", "LEFUSION_MODE", "LEFUSION_CACHE"):
        monkeypatch.delenv(var, raising=False)
    assert load_settings().rate == 0.5
    cfg = tmp_path / "lefusion.yaml"
    cfg.write_text("rate: 0.3\ncache: /some/where\n")
    assert (load_settings(cfg).rate, load_settings(cfg).cache) == (0.3, "/some/where")
    monkeypatch.setenv("LEFUSION_RATE", "0.8")
    assert load_settings(cfg).rate == 0.8
    monkeypatch.setenv("LEFUSION_RATE", "2")
    with pytest.raises(LeFusionError, match="rate"):
        load_settings(cfg)
    monkeypatch.delenv("LEFUSION_RATE")
    cfg.write_text("rat: 0.3\n")
    with pytest.raises(LeFusionError, match="unknown keys"):
        load_settings(cfg)


def test_one_frozen_settings_object_with_the_short_run_schedule(tmp_path, monkeypatch):
    for var in ENV_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    written = TrainerSettings(rate=0.25, mode="online", method="lefusion", mix="retexture=1", epochs=3, iterations=7,
                              val_iterations=1, cpu_bf16=True)
    path = write_settings(written, tmp_path / "run" / "lefusion.yaml")
    monkeypatch.setenv("LEFUSION_CONFIG", str(path))
    assert load_settings() == written, "the file holds everything the trainer reads"
    with pytest.raises(FrozenInstanceError):
        written.rate = 1.0
    monkeypatch.setenv("LEFUSION_ITERS", "12")
    monkeypatch.setenv("LEFUSION_EPOCHS", "0")
    with pytest.raises(LeFusionError, match="epochs must be a positive integer"):
        load_settings()
    monkeypatch.delenv("LEFUSION_EPOCHS")
    assert (load_settings().epochs, load_settings().iterations) == (3, 12)
    (tmp_path / "mapping.yaml").write_text("mix: {newmask: 0.5, normal: 0.5}\n")
    monkeypatch.setenv("LEFUSION_CONFIG", str(tmp_path / "mapping.yaml"))
    assert load_settings().mix == "newmask=0.5,normal=0.5"
