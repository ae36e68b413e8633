"""Fill a synthetic cache: raw training cases -> synthesizer -> nnU-Net's preprocessor -> Blosc2 cache."""
from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import (Manifest, default_cache_folder, remove_stale_temporaries, write_case)
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.preprocess import load_raw_case, preprocess_case
from nnunet_lefusion.synthesis.base import RawCase, Synthesizer, SynthesisSkipped, lesion_voxel_counts
from nnunet_lefusion.synthesis.copypaste import CopyPasteSynthesizer

METHODS = ("copypaste",)


def make_synthesizer(method: str, cases: list[RawCase], labels: LesionLabels) -> Synthesizer:
    """The synthesizer called ``method``, set up on the fold's training cases."""
    if method == "copypaste":
        try:
            return CopyPasteSynthesizer(cases, labels)
        except SynthesisSkipped as exc:
            raise LeFusionError(f"copy-paste impossible: {exc}") from None
    raise LeFusionError(f"unknown synthesis method {method!r} (available: {', '.join(METHODS)})")


def existing_manifest(ctx: DatasetContext, folder: Path, overwrite: bool) -> Manifest | None:
    """The cache manifest to append to, if one exists and matches these plans/fold (checked before any work)."""
    if overwrite or not (folder / "manifest.json").exists():
        return None
    manifest = Manifest.load(folder)
    try:
        manifest.check_matches(ctx, ctx.split[0], folder)
    except LeFusionError as exc:
        raise LeFusionError(f"{exc} (use --overwrite to replace it)") from None
    return manifest


def start_cache(ctx: DatasetContext, folder: Path, existing: Manifest | None) -> Manifest:
    """Prepare the folder: keep a matching cache (minus stale temporaries), else start an empty one."""
    if existing is not None:
        remove_stale_temporaries(folder)
        return existing
    if (folder / "manifest.json").exists():
        shutil.rmtree(folder)  # --overwrite of a cache (never of a folder that is not one)
    elif folder.exists() and any(folder.iterdir()):
        raise LeFusionError(f"{folder} exists and is not a LeFusion cache; choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.for_context(ctx)
    manifest.save(folder)
    return manifest


def _case_seed(seed: int, identifier: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{identifier}/{index}".encode())


def synthesize_cache(ctx: DatasetContext, labels: LesionLabels, method: str, num_cases: int, seed: int = 0,
                     cache_folder: Path | None = None, overwrite: bool = False) -> tuple[Path, Manifest]:
    """Write ``num_cases`` synthetic variants of the fold's training cases (spread evenly over them)."""
    if num_cases < 1:
        raise LeFusionError(f"the number of synthetic cases must be >= 1, got {num_cases}")
    folder = Path(cache_folder) if cache_folder else default_cache_folder(ctx)
    training = sorted(ctx.split[0])
    existing = existing_manifest(ctx, folder, overwrite)
    cases = [load_raw_case(ctx, i) for i in tqdm(training, desc="reading training cases", unit="case")]
    if not any(np.isin(c.seg, labels.lesions).any() for c in cases):
        raise LeFusionError(f"no training case of fold {ctx.fold} contains a lesion label {list(labels.lesions)}")
    synthesizer = make_synthesizer(method, cases, labels)
    manifest = start_cache(ctx, folder, existing)
    manifest.lesion_labels = labels.to_dict()
    manifest.real_lesion_voxels = real_lesion_voxels(cases, labels)
    by_id = {c.identifier: c for c in cases}
    order = np.random.default_rng(seed).permutation(training)
    made: dict[str, int] = {s: len(v) for s, v in manifest.variants_by_source().items()}
    skipped = 0
    with tqdm(total=num_cases, desc=f"synthesizing ({method})", unit="case") as bar:
        attempt = 0
        while bar.n < num_cases:
            if attempt >= 2 * num_cases + len(order):
                raise LeFusionError(f"only {bar.n} of {num_cases} cases could be synthesized ({skipped} skipped)")
            source = str(order[attempt % len(order)])
            attempt += 1
            index = made.get(source, 0)
            rng = np.random.default_rng(_case_seed(seed, source, index))
            try:
                synthetic = synthesizer.synthesize(by_id[source], rng)
            except SynthesisSkipped:
                skipped += 1
                continue
            data, seg, properties = preprocess_case(ctx, synthetic.case)
            syn_id = f"{source}__syn{index:03d}"
            provenance = {"source": source, "seed": int(_case_seed(seed, source, index)), **synthetic.provenance}
            properties["lefusion"] = provenance
            write_case(folder, syn_id, data, seg, properties, ctx.configuration_manager.patch_size)
            manifest.cases[syn_id] = provenance
            manifest.save(folder)
            made[source] = index + 1
            bar.update(1)
    return folder, manifest


def real_lesion_voxels(cases: list[RawCase], labels: LesionLabels) -> dict[str, int]:
    """Lesion voxels per label over real cases (raw grid)."""
    totals = {str(lab): 0 for lab in labels.lesions}
    for case in cases:
        for label, n in lesion_voxel_counts(case.seg, labels).items():
            totals[label] += n
    return totals
