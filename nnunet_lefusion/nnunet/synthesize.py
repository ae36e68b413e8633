"""Fill a synthetic cache: raw training cases -> synthesizer -> nnU-Net's preprocessor -> Blosc2 cache."""
from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import MaskGenerator, RuleBasedMaskGenerator
from nnunet_lefusion.nnunet.cache import (Manifest, default_cache_folder, remove_stale_temporaries, write_case)
from nnunet_lefusion.nnunet.context import DatasetContext
from nnunet_lefusion.nnunet.preprocess import load_raw_case, preprocess_case
from nnunet_lefusion.synthesis.base import (Proposal, RawCase, Synthesizer, SynthesisSkipped,
                                            lesion_voxel_counts)
from nnunet_lefusion.synthesis.copypaste import CopyPasteSynthesizer
from nnunet_lefusion.synthesis.plan import ShareTracker, SynthesisPlan

METHODS = ("copypaste", "lefusion")


@dataclass
class SynthesizerOptions:
    """What the LeFusion method needs beyond the cases: its checkpoint, sampling mode and mask generator."""

    checkpoint: str | None = None
    mode: str = "fast"
    device: str = "cpu"
    mask_generator: str | None = None  # "rule" or a learned mask-generator checkpoint
    histogram_matching: bool = True  # lesion intensities take their histogram condition exactly


def make_mask_generator(spec: str | None, labels: LesionLabels, device: str) -> MaskGenerator | None:
    """``None``, the rule-based generator (``"rule"``) or a learned one loaded from a checkpoint path."""
    if spec is None:
        return None
    if spec == "rule":
        return RuleBasedMaskGenerator(labels)
    from nnunet_lefusion.masks.learned import LearnedMaskGenerator

    return LearnedMaskGenerator.load(spec, device)


def make_synthesizer(method: str, cases: list[RawCase], labels: LesionLabels,
                     options: SynthesizerOptions | None = None) -> Synthesizer:
    """The synthesizer called ``method``, set up on the fold's training cases."""
    options = options or SynthesizerOptions()
    if method == "copypaste":
        try:
            return CopyPasteSynthesizer(cases, labels)
        except SynthesisSkipped as exc:
            raise LeFusionError(f"copy-paste impossible: {exc}") from None
    if method == "lefusion":
        if not options.checkpoint:
            raise LeFusionError("--method lefusion needs --checkpoint (train one with nnUNetv2_lefusion_train_sampler)")
        from nnunet_lefusion.synthesis.lefusion import LeFusionSynthesizer

        return LeFusionSynthesizer(options.checkpoint, labels, options.mode, options.device,
                                   mask_generator=make_mask_generator(options.mask_generator, labels, options.device),
                                   histogram_matching=options.histogram_matching)
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


def _pools(cases: list[RawCase], labels: LesionLabels, seed: int) -> dict[str, list[RawCase]]:
    """Targets per kind, each in a seeded order: pathological cases for retexture/newmask, normal ones for normal."""
    rng = np.random.default_rng(seed)
    pathological = [c for c in cases if np.isin(c.seg, labels.lesions).any()]
    normal = [c for c in cases if not np.isin(c.seg, labels.lesions).any()]
    pathological = [pathological[i] for i in rng.permutation(len(pathological))]
    normal = [normal[i] for i in rng.permutation(len(normal))]
    return {"retexture": pathological, "newmask": pathological, "normal": normal}


def default_plan(synthesizer: Synthesizer, pools: dict[str, list[RawCase]]) -> SynthesisPlan:
    """Without ``--mix``: every training case that the synthesizer can use, in proportion to the pools."""
    if "retexture" in synthesizer.kinds:
        return SynthesisPlan(mix={"retexture": 1.0})
    return SynthesisPlan(mix={k: float(len(pools[k])) for k in synthesizer.kinds if pools[k]})


def synthesize_cache(ctx: DatasetContext, labels: LesionLabels, method: str, num_cases: int, seed: int = 0,
                     cache_folder: Path | None = None, overwrite: bool = False,
                     plan: SynthesisPlan | None = None,
                     options: SynthesizerOptions | None = None) -> tuple[Path, Manifest]:
    """Write ``num_cases`` synthetic variants of the fold's training cases, following ``plan``."""
    if num_cases < 1:
        raise LeFusionError(f"the number of synthetic cases must be >= 1, got {num_cases}")
    folder = Path(cache_folder) if cache_folder else default_cache_folder(ctx)
    existing = existing_manifest(ctx, folder, overwrite)
    cases = [load_raw_case(ctx, i) for i in tqdm(sorted(ctx.split[0]), desc="reading training cases", unit="case")]
    if not any(np.isin(c.seg, labels.lesions).any() for c in cases):
        raise LeFusionError(f"no training case of fold {ctx.fold} contains a lesion label {list(labels.lesions)}")
    synthesizer = make_synthesizer(method, cases, labels, options)
    pools = _pools(cases, labels, seed)
    plan = (plan or default_plan(synthesizer, pools)).validate(labels)
    for kind in plan.mix:
        if kind not in synthesizer.kinds and plan.mix[kind] > 0:
            raise LeFusionError(f"method {method} cannot make {kind!r} cases (it makes {', '.join(synthesizer.kinds)})")
        if plan.mix[kind] > 0 and not pools[kind]:
            raise LeFusionError(f"no training case of fold {ctx.fold} can be a {kind!r} target "
                                f"({'no normal case' if kind == 'normal' else 'no case with lesions'})")
    manifest = start_cache(ctx, folder, existing)
    manifest.lesion_labels = labels.to_dict()
    manifest.real_lesion_voxels = real_lesion_voxels(cases, labels)
    tracker = ShareTracker(labels, plan.target_share)
    tracker.totals.update({int(k): v for k, v in manifest.lesion_voxel_totals().items()})
    made: dict[str, int] = {s: len(v) for s, v in manifest.variants_by_source().items()}
    next_target = {kind: 0 for kind in pools}
    pending: list[tuple[str, int, Proposal]] = []  # (synthetic id, seed, proposal) waiting to be rendered

    def flush() -> None:
        """Render the pending proposals in one batch, preprocess them with nnU-Net and add them to the cache."""
        rendered = synthesizer.render_many([p for _, _, p in pending], np.random.default_rng(pending[0][1]))
        for (syn_id, case_seed, proposal), synthetic in zip(pending, rendered):
            data, seg, properties = preprocess_case(ctx, synthetic.case)
            provenance = {"source": proposal.target.identifier, "seed": case_seed, **synthetic.provenance}
            properties["lefusion"] = provenance
            write_case(folder, syn_id, data, seg, properties, ctx.configuration_manager.patch_size)
            manifest.cases[syn_id] = provenance
            manifest.save(folder)
            bar.update(1)
        pending.clear()

    batch_size = getattr(synthesizer, "batch_size", 1)
    with tqdm(total=num_cases, desc=f"synthesizing ({method})", unit="case") as bar:
        for kind in plan.allocate(num_cases):
            pool = pools[kind]
            for _ in range(len(pool)):  # a target that cannot host a lesion is skipped for the next one
                target = pool[next_target[kind] % len(pool)]
                next_target[kind] += 1
                index = made.get(target.identifier, 0)
                case_seed = _case_seed(seed, target.identifier, index)
                rng = np.random.default_rng(case_seed)
                try:
                    proposals = [synthesizer.propose(target, kind, rng)
                                 for _ in range(plan.candidates if plan.target_share and kind != "retexture" else 1)]
                except SynthesisSkipped:
                    continue
                break
            else:
                raise LeFusionError(f"no {kind!r} target could be synthesized by {method}")
            chosen = proposals[tracker.pick([p.seg for p in proposals])]
            tracker.add(chosen.seg)
            pending.append((f"{target.identifier}__syn{index:03d}", case_seed, chosen))
            made[target.identifier] = index + 1
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    return folder, manifest


def real_lesion_voxels(cases: list[RawCase], labels: LesionLabels) -> dict[str, int]:
    """Lesion voxels per label over real cases (raw grid)."""
    totals = {str(lab): 0 for lab in labels.lesions}
    for case in cases:
        for label, n in lesion_voxel_counts(case.seg, labels).items():
            totals[label] += n
    return totals
