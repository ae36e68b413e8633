"""The synthetic-case cache: nnU-Net preprocessed cases (Blosc2) outside ``nnUNetPlans_<cfg>/`` plus a manifest.

Layout: ``$nnUNet_preprocessed/<Dataset>/lefusion_cache/<data_identifier>/fold_<f>/``
holding ``manifest.json`` and, per synthetic case, ``<id>.b2nd``, ``<id>_seg.b2nd`` and ``<id>.pkl``.
Every file is written under a temporary name and renamed; a case counts only once the manifest lists it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.nnunet.context import DatasetContext

MANIFEST = "manifest.json"
FORMAT = "nnunet-lefusion-cache"
VERSION = 1
_TMP_PREFIX = ".tmp-"


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
    """What a cache holds and what it was made for."""

    dataset: str
    configuration: str
    data_identifier: str
    plans_identifier: str
    fold: int | str
    plans_fingerprint: str
    training_cases: list[str]
    cases: dict[str, dict] = field(default_factory=dict)  # synthetic id -> provenance (source, method, ...)
    lesion_labels: dict = field(default_factory=dict)  # LesionLabels.to_dict() the cache was made with
    real_lesion_voxels: dict = field(default_factory=dict)  # lesion voxels per label in the training cases
    format: str = FORMAT
    version: int = VERSION

    @classmethod
    def for_context(cls, ctx: DatasetContext) -> "Manifest":
        return cls(ctx.dataset, ctx.configuration, ctx.configuration_manager.data_identifier, ctx.plans_identifier,
                   ctx.fold, plans_fingerprint(ctx), sorted(ctx.split[0]))

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
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise LeFusionError(f"corrupt cache manifest {path}: {exc}") from None

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST, json.dumps(asdict(self), indent=1, sort_keys=True))

    def check_matches(self, ctx: DatasetContext, training_cases: list[str], folder: Path) -> None:
        """Raise if this cache was made for other plans, another configuration or another fold/split."""
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

    def lesion_voxel_totals(self) -> dict[str, int]:
        """Lesion voxels per label over all synthetic cases (raw grid), from their provenance."""
        totals: dict[str, int] = {}
        for info in self.cases.values():
            for label, n in info.get("lesion_voxels", {}).items():
                totals[label] = totals.get(label, 0) + int(n)
        return totals

    def variants_by_source(self) -> dict[str, list[str]]:
        """source identifier -> sorted synthetic identifiers made from it."""
        out: dict[str, list[str]] = {}
        for syn_id, info in sorted(self.cases.items()):
            out.setdefault(info["source"], []).append(syn_id)
        return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by an interrupted writer."""
    for p in Path(folder).glob(f"{_TMP_PREFIX}*"):
        p.unlink(missing_ok=True)


def write_case(folder: Path, identifier: str, data: np.ndarray, seg: np.ndarray, properties: dict,
               patch_size: tuple[int, ...]) -> None:
    """Save one preprocessed case like nnU-Net's preprocessor does (Blosc2, chunking for ``patch_size``)."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data = np.ascontiguousarray(data, dtype=np.float32)
    seg = np.ascontiguousarray(seg, dtype=np.int16)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(patch_size), seg.itemsize)
    tmp = str(Path(folder) / f"{_TMP_PREFIX}{identifier}")
    nnUNetDatasetBlosc2.save_case(data, seg, properties, tmp, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)
    final = str(Path(folder) / identifier)
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # the .pkl last: it marks a complete case on disk
        os.replace(tmp + suffix, final + suffix)


def remove_case(folder: Path, identifier: str) -> None:
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        (Path(folder) / f"{identifier}{suffix}").unlink(missing_ok=True)
