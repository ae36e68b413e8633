"""The synthetic-case cache: nnU-Net preprocessed cases (Blosc2) outside ``nnUNetPlans_<cfg>/`` plus a manifest.

Layout: ``$nnUNet_preprocessed/<Dataset>/lefusion_cache/<data_identifier>/fold_<f>/``
holding ``manifest.json`` and, per synthetic case, ``<id>.b2nd``, ``<id>_seg.b2nd`` and ``<id>.pkl``.
This module holds what the manifest says; :mod:`~nnunet_lefusion.nnunet.cache_store` reads and writes the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels, resolve_lesion_labels
from nnunet_lefusion.nnunet.cache_lock import tmp_name
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.provenance import check_no_leak

MANIFEST = "manifest.json"
FORMAT = "nnunet-lefusion-cache"
VERSION = 2
CASE_FILES = (".b2nd", "_seg.b2nd", ".pkl")  # the .pkl last: it marks a complete case on disk
ONLINE = "online"  # provenance key of a case made during training (online mode)
POOL = "pool"  # manifest key of an online case adopted into a later run's pool (its maker's writer had gone)


def default_cache_folder(ctx: DatasetContext) -> Path:
    """Where the cache of a dataset/configuration/fold lives unless the user names another folder."""
    return ctx.preprocessed_folder / "lefusion_cache" / ctx.configuration_manager.data_identifier / f"fold_{ctx.fold}"


def plans_fingerprint(ctx: DatasetContext) -> str:
    """Hash of everything in the plans that shapes a preprocessed case (geometry, normalisation, labels)."""
    cfg = ctx.configuration_manager.configuration
    data_keys = ("data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
                 "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg", "resampling_fn_seg_kwargs")
    payload = {
        "configuration": {k: cfg.get(k) for k in data_keys},
        "transpose_forward": ctx.plans.get("transpose_forward"),
        "image_reader_writer": ctx.plans.get("image_reader_writer"),
        "intensity": ctx.plans.get("foreground_intensity_properties_per_channel"),
        "labels": ctx.dataset_json.get("labels"),
        "regions_class_order": ctx.dataset_json.get("regions_class_order"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """What a cache holds, what it was made for and from, and the runs that filled it.

    ``label_fingerprint``: hash of the fold's training cases and their raw label files. ``position``: per kind, the
    next place in the kind's target pool (appending continues there); ``next_index``: the number the next case
    gets. ``runs``: one entry per ``nnUNetv2_lefusion_synthesize`` run: its request, the cases it reserved
    (``first`` .. ``first + num_cases``), where it started, the writer of each part and its generators.
    """

    dataset: str
    configuration: str
    data_identifier: str
    plans_identifier: str
    fold: int | str
    plans_fingerprint: str
    training_cases: list[str]
    label_fingerprint: str = ""
    cases: dict[str, dict] = field(default_factory=dict)  # synthetic id -> provenance (source, method, run, ...)
    lesion_labels: dict = field(default_factory=dict)  # LesionLabels.to_dict() the cache was made with
    real_lesion_voxels: dict = field(default_factory=dict)  # lesion voxels per label in the training cases
    position: dict[str, int] = field(default_factory=dict)
    next_index: int = 0
    runs: list[dict] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def for_context(cls, ctx: DatasetContext) -> "Manifest":
        return cls(ctx.dataset, ctx.configuration, ctx.configuration_manager.data_identifier, ctx.plans_identifier,
                   ctx.fold, plans_fingerprint(ctx), sorted(ctx.split[0]), ctx.training_label_fingerprint())

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise LeFusionError(f"no synthetic cache at {folder} ({MANIFEST} missing); "
                                "create one with nnUNetv2_lefusion_synthesize or set the rate to 0")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError("not a LeFusion cache manifest")
            if raw.get("version") != VERSION:
                raise ValueError(f"format version {raw.get('version')}, this plugin reads {VERSION}; re-create it "
                                 f"with nnUNetv2_lefusion_synthesize --overwrite")
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise LeFusionError(f"corrupt cache manifest {path}: {exc}") from None

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST, json.dumps(asdict(self), indent=1, sort_keys=True))

    def check_matches(self, ctx: DatasetContext, training_cases: list[str], folder: Path) -> None:
        """Raise if this cache was made for other plans, another configuration, another fold/split or other raw
        labels, if a listed case's files are missing, or if a generator it used saw a validation case."""
        if (self.dataset, self.configuration) != (ctx.dataset, ctx.configuration):
            raise LeFusionError(f"cache {folder} was made for {self.dataset} {self.configuration}, "
                                f"not {ctx.dataset} {ctx.configuration}")
        current = plans_fingerprint(ctx)
        if self.plans_fingerprint != current:
            raise LeFusionError(f"cache {folder} was made for other plans (fingerprint {self.plans_fingerprint}, "
                                f"current {current}); re-run nnUNetv2_lefusion_synthesize")
        if str(self.fold) != str(ctx.fold):
            raise LeFusionError(f"cache {folder} was made for fold {self.fold}, not fold {ctx.fold}")
        leaked = sorted({c["source"] for c in self.cases.values()} - set(training_cases))
        if leaked:
            raise LeFusionError(f"cache {folder} uses cases that are not training cases of fold {ctx.fold}: "
                                f"{leaked[:5]}{' ...' if len(leaked) > 5 else ''}")
        labels = ctx.training_label_fingerprint()
        if self.label_fingerprint != labels:
            raise LeFusionError(f"cache {folder} was made from other raw labels of the training cases (fingerprint "
                                f"{self.label_fingerprint}, current {labels}): were they relabelled? re-create it")
        missing = [i for i in sorted(self.cases) if not all((Path(folder) / f"{i}{s}").is_file() for s in CASE_FILES)]
        if missing:
            raise LeFusionError(f"cache {folder} lists {len(missing)} case(s) whose files are missing, e.g. "
                                f"{missing[0]}; re-create it")
        check_no_leak([g for run in self.runs for g in run["generators"]], ctx.held_out_hashes(), ctx.fold,
                      f"cache {folder}")

    def lesion_voxel_totals(self) -> dict[str, int]:
        """Lesion voxels per label over all synthetic cases (raw grid), from their provenance."""
        totals: dict[str, int] = {}
        for info in self.cases.values():
            for label, n in info.get("lesion_voxels", {}).items():
                totals[label] = totals.get(label, 0) + int(n)
        return totals

    def online_ids(self, pool: int | None = None) -> list[str]:
        """The cases made during training (online mode), oldest (lowest case number) first; with ``pool`` only those
        of that online run's pool."""
        ids = (i for i, c in self.cases.items() if ONLINE in c and (pool is None or pool_of(c) == pool))
        return sorted(ids, key=lambda i: (self.cases[i]["slot"], i))

    def retire_online(self, pool: int, pool_max: int) -> list[str]:
        """Drop the oldest cases of online run ``pool``'s pool beyond ``pool_max`` from the manifest; returns their
        identifiers (the caller deletes their files once the saved manifest no longer lists them). Cases of other
        runs' pools and offline cases are never retired."""
        ids = self.online_ids(pool)
        retired = ids[:max(0, len(ids) - pool_max)]
        for identifier in retired:
            del self.cases[identifier]
        return retired

    def variants_by_source(self) -> dict[str, list[str]]:
        """source identifier -> sorted synthetic identifiers made from it."""
        out: dict[str, list[str]] = {}
        for syn_id, info in sorted(self.cases.items()):
            out.setdefault(info["source"], []).append(syn_id)
        return out


def pool_of(case: dict) -> int:
    """The online run whose pool holds ``case`` (the run that made it unless another adopted it, ``POOL``)."""
    return case.get(POOL, case["run"])


def recorded_labels(manifest: Manifest | None, dataset_json: dict) -> LesionLabels:
    """The lesion labels a cache was made with, else those named in ``dataset_json`` (``LeFusionError`` if
    neither gives them)."""
    if manifest is not None and manifest.lesion_labels:
        return LesionLabels.from_dict(manifest.lesion_labels)
    return resolve_lesion_labels(dataset_json)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, flushed to disk, a rename and a flush
    of the folder (a crash, power loss included, leaves the old file or the new one, never a part); the temporary
    file is removed if writing fails."""
    tmp = path.with_name(tmp_name(path.name))
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
