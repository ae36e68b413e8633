"""Which cases a generator saw: nnU-Net's fold split, label-file hashes and the leakage check.

A generator checkpoint (sampler or mask generator) records ``training_data`` = ``{"dataset", "fold", "cases":
{identifier: label hash}}``. A case counts as the same case only if both its identifier and the hash of its label
file agree, so another dataset that reuses the names (e.g. the phantom the shipped weights were trained on) is
told apart.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from nnunet_lefusion.errors import LeFusionError

FOLD_HELP = ("nnU-Net fold whose training cases to train on (its split from splits_final.json in nnUNet_preprocessed, "
             "else nnU-Net's default 5-fold split, which is then written there), or 'all' (default). Pass the fold "
             "you will train nnU-Net on: nnUNetv2_lefusion_synthesize refuses a generator that saw a validation "
             "case of its fold")


def nnunet_split(identifiers: list[str], fold: int | str,
                 preprocessed_base: Path | None) -> tuple[list[str], list[str]]:
    """(training, validation) identifiers of ``fold`` as nnU-Net 2.8's ``nnUNetTrainer.do_split`` gives them:
    ``splits_final.json`` in ``preprocessed_base`` when it exists, else nnU-Net's seeded 5-fold split, written there as
    the first ``nnUNetv2_train`` would; a fold beyond the file's splits: nnU-Net's seeded 80:20 split; ``all``: every
    case (validation = training, as in nnU-Net; no folder needed). Mirrored here because importing nnU-Net's trainer
    module costs every command seconds; ``tests/test_fold_leakage.py`` holds it to ``do_split``."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = sorted(str(k) for k in identifiers)   # nnU-Net's dataset classes may list numpy strings
    if fold == "all":
        return ids, list(ids)
    splits_file = preprocessed_base / "splits_final.json"
    try:
        if splits_file.is_file():
            splits = json.loads(splits_file.read_text())
        elif len(ids) < 5:
            raise LeFusionError(f"fold {fold} needs nnU-Net's 5-fold split, but the dataset has only {len(ids)} "
                                f"training case(s): add cases, use -f all, or write your own splits_final.json to "
                                f"{preprocessed_base}")
        else:
            preprocessed_base.mkdir(parents=True, exist_ok=True)
            splits = generate_crossval_split(ids, seed=12345, n_splits=5)
            save_json(splits, str(splits_file))
        if int(fold) < len(splits):
            tr, val = splits[int(fold)]["train"], splits[int(fold)]["val"]
        else:
            chosen = np.random.RandomState(seed=12345 + int(fold)).choice(len(ids), int(len(ids) * 0.8), replace=False)
            tr, val = [ids[i] for i in chosen], [ids[i] for i in range(len(ids)) if i not in chosen]
    except (KeyError, TypeError, ValueError) as exc:
        raise LeFusionError(f"cannot read the split of fold {fold} from {splits_file} "
                            f"({type(exc).__name__}: {exc})") from None
    return [str(k) for k in tr], [str(k) for k in val]


def label_hash(path: str | Path) -> str:
    """Content hash of a label file (its bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def training_record(dataset: str, fold: int | str, label_files: dict[str, str | Path]) -> dict:
    """The ``training_data`` a generator trained on ``label_files`` (identifier -> label file) records."""
    return {"dataset": str(dataset), "fold": str(fold),
            "cases": {k: label_hash(v) for k, v in sorted(label_files.items())}}


def fingerprint(hashes: dict[str, str]) -> str:
    """One hash of a set of (identifier, label hash) pairs."""
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:16]


def describe(record: dict | None) -> str:
    """``fold 0 of Dataset990_X (8 cases, fingerprint ...)`` for messages and the manifest."""
    if not record:
        return "unknown cases (no record)"
    return (f"fold {record['fold']} of {record['dataset']} ({len(record['cases'])} cases, "
            f"fingerprint {fingerprint(record['cases'])})")


def raw_fold(dataset: str, raw_folder: Path, dataset_json: dict, fold: int | str) -> tuple[dict, dict]:
    """(training-case files {id: {'images', 'label'}}, ``training_record``) of ``fold`` of a raw dataset whose
    ``dataset.json`` (:func:`~nnunet_lefusion.nnunet.context.raw_dataset_json`) is given."""
    from nnunet_lefusion.nnunet.context import env_folder, raw_training_files

    files = raw_training_files(raw_folder, dataset_json)
    if not files:
        raise LeFusionError(f"{raw_folder} has no training cases (imagesTr/labelsTr)")
    base = env_folder("nnUNet_preprocessed") / dataset if fold != "all" else None
    train, _ = nnunet_split(list(files), fold, base)
    chosen = {k: files[k] for k in sorted(train)}
    return chosen, training_record(dataset, fold, {k: v["label"] for k, v in chosen.items()})


def leaked_cases(record: dict | None, held_out: dict[str, str]) -> list[str]:
    """Held-out cases (identifier -> label hash) that a generator with ``record`` saw: same id and same hash."""
    seen = (record or {}).get("cases", {})
    return sorted(k for k, h in held_out.items() if seen.get(k) == h)


def check_no_leak(generators: list[dict], held_out: dict[str, str], fold: int | str, what: str) -> None:
    """``LeFusionError`` if a generator (``{"role", "path", "training_data"}``) saw a held-out case of ``fold``."""
    for generator in generators:
        leaked = leaked_cases(generator.get("training_data"), held_out)
        if leaked:
            raise LeFusionError(
                f"{what}: the {generator['role']} {generator['path']} was trained on validation case(s) of fold "
                f"{fold}: {', '.join(leaked[:5])}{' ...' if len(leaked) > 5 else ''}; train it with -f {fold}")
