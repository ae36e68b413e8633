"""Fill a synthetic cache: raw training cases -> synthesizer -> nnU-Net's preprocessor -> Blosc2 cache.

A run reserves, under the cache lock, the case numbers ``first .. first + n`` and the places in the target pools
where it starts (appending continues where the last run stopped). Everything else follows from the run's entry:
case ``i`` is made from seed ``(seed, i)``, and the cases are rendered in fixed batches of ``batch_size``. So
``-num_parts N -part_id p`` (part ``p`` renders batches ``p, p + N, ...``) gives the same cases as one run, and a
killed run, started again with the same command, takes over its part and makes only the missing cases.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.config import METHODS
from nnunet_lefusion.diffusion.histograms import read_official_clusters
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.masks import MaskGenerator, RuleBasedMaskGenerator
from nnunet_lefusion.model.checkpoint import read_meta
from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.cache_lock import token
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.nnunet.context import DatasetContext, check_parts, part_of
from nnunet_lefusion.nnunet.provenance import check_no_leak
from nnunet_lefusion.nnunet.preprocess import load_raw_case, preprocess_case
from nnunet_lefusion.synthesis.base import (Proposal, RawCase, Synthesizer, SynthesisSkipped,
                                            lesion_voxel_counts)
from nnunet_lefusion.synthesis.copypaste import CopyPasteSynthesizer
from nnunet_lefusion.synthesis.plan import ShareTracker, SynthesisPlan



@dataclass
class SynthesizerOptions:
    """What the LeFusion method needs beyond the cases: its checkpoint, sampling mode and mask generator."""

    checkpoint: str | None = None
    mode: str = "fast"
    device: str = "cpu"
    mask_generator: str | None = None  # "rule" or a learned mask-generator checkpoint
    # lesion intensities take their histogram condition exactly; None: unless the sampler has a level offset
    histogram_matching: bool | None = None
    clusters: str | None = None  # an official histogram-cluster JSON instead of the checkpoint's clusters


def with_shipped_generators(method: str, options: SynthesizerOptions, labels: LesionLabels,
                            plan: SynthesisPlan | None) -> SynthesizerOptions:
    """``options`` with what a LeFusion run needs but was not given (the sampler; the mask generator when the plan
    draws new masks) taken from ``pretrained/``, where the dataset's labels are those the shipped weights learnt;
    ``LeFusionError`` naming the missing flag otherwise."""
    if method != "lefusion":
        return options
    from nnunet_lefusion.pretrained import default_generator

    checkpoint = options.checkpoint or default_generator("sampler", labels)
    masks = options.mask_generator
    if masks is None and plan is not None and plan.new_masks:
        masks = default_generator("mask generator", labels)
    return replace(options, checkpoint=checkpoint, mask_generator=masks)


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
        channels = {case.image.shape[0] for case in cases}
        if channels != {1}:
            raise LeFusionError(f"LeFusion re-textures one image channel, but the cases have {max(channels)}: "
                                "lesion labels would lie on untouched tissue in the others; use --method copypaste")
        if not options.checkpoint:
            raise LeFusionError("--method lefusion needs --checkpoint (train one with nnUNetv2_lefusion_train_sampler)")
        from nnunet_lefusion.synthesis.lefusion import LeFusionSynthesizer

        return LeFusionSynthesizer(options.checkpoint, labels, options.mode, options.device,
                                   mask_generator=make_mask_generator(options.mask_generator, labels, options.device),
                                   histogram_matching=options.histogram_matching, clusters=options.clusters)
    raise LeFusionError(f"unknown synthesis method {method!r} (available: {', '.join(METHODS)})")


def check_generator_files(method: str, options: SynthesizerOptions, labels: LesionLabels) -> None:
    """Refuse, before any case is read, a LeFusion run without a readable sampler checkpoint, whose checkpoint or
    mask generator is another kind of file, whose histogram clusters are missing (an official checkpoint has none)
    or not an official cluster file for ``labels``, or whose learned mask generator draws other lesion or organ
    labels than ``labels`` (it draws its own: they would land as the wrong classes; metadata only, the networks are
    checked when they are built)."""
    if method != "lefusion":
        return
    from nnunet_lefusion.masks.learned import MASK_KIND
    from nnunet_lefusion.training.sampler import SAMPLER_KIND

    if not options.checkpoint:
        raise LeFusionError("--method lefusion needs --checkpoint (train one with nnUNetv2_lefusion_train_sampler)")
    meta = read_meta(options.checkpoint)  # None: an official checkpoint, checked when loaded
    if meta is not None and meta.extras.get("kind") != SAMPLER_KIND:
        raise LeFusionError(f"--checkpoint {options.checkpoint} is not a LeFusion sampler checkpoint (kind "
                            f"{meta.extras.get('kind')!r}); a mask generator goes to --mask-generator")
    if options.clusters:
        read_official_clusters(options.clusters, len(labels.lesions))
    elif meta is None:
        raise LeFusionError(f"--checkpoint {options.checkpoint} is an official checkpoint, which holds no histogram "
                            f"clusters: give the official ones with --clusters FILE (hist_clusters/"
                            f"emidec_clusters.json of LeFusion; online mode: settings key clusters or "
                            f"LEFUSION_CLUSTERS)")
    if options.mask_generator not in (None, "rule"):
        meta = read_meta(options.mask_generator)
        kind = meta.extras.get("kind") if meta is not None else None
        if kind != MASK_KIND:
            raise LeFusionError(f"--mask-generator {options.mask_generator} is not a lesion-mask generator "
                                f"checkpoint (kind {kind!r}); give 'rule' or a checkpoint of "
                                f"nnUNetv2_lefusion_train_masks")
        drawn = LesionLabels.from_dict(meta.extras["labels"])
        if (drawn.lesions, drawn.organ) != (labels.lesions, labels.organ):
            raise LeFusionError(f"--mask-generator {options.mask_generator} draws lesion labels {list(drawn.lesions)} "
                                f"(outer to inner) in organ {list(drawn.organ)}, not {list(labels.lesions)} in "
                                f"{list(labels.organ)}: train one on this dataset with nnUNetv2_lefusion_train_masks")


def generator_records(method: str, options: SynthesizerOptions) -> list[dict]:
    """Role, path and recorded training cases (``CheckpointMeta.training_data``) of the trained generators used, and
    of the histogram-cluster file given (its cases unrecorded)."""
    used = [("sampler", options.checkpoint), ("mask generator", options.mask_generator)] if method == "lefusion" else []
    records = []
    for role, path in used:
        if path and path != "rule":
            meta = read_meta(path)
            records.append({"role": role, "path": str(Path(path).resolve()),
                            "training_data": meta.training_data if meta is not None else None})
            start = meta.extras.get("initialised_from", {}) if meta is not None else {}
            for seen in start.get("training_data", []):  # a fine-tuned generator also saw what it started from
                records.append({"role": f"{role} (its initial weights, {start['file']})",
                                "path": str(Path(path).resolve()), "training_data": seen})
    if method == "lefusion" and options.clusters:
        records.append({"role": "histogram clusters", "path": str(Path(options.clusters).resolve()),
                        "training_data": None})
    return records


def generator_paths(generators: list[dict]) -> list[str]:
    """The files of ``generator_records``, each once, in order (the request a cache run records)."""
    return list(dict.fromkeys(g["path"] for g in generators))


def _case_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{index}".encode())


def _pools(cases: list[RawCase], labels: LesionLabels) -> dict[str, list[RawCase]]:
    """Targets per kind, in identifier order: pathological cases for retexture/newmask, normal ones for normal."""
    pathological = [c for c in cases if np.isin(c.seg, labels.lesions).any()]
    normal = [c for c in cases if not np.isin(c.seg, labels.lesions).any()]
    return {"retexture": pathological, "newmask": pathological, "normal": normal}


@dataclass
class Slot:
    """One case of a run: its number in the cache, its kind, the pool place it starts at and its seed."""

    index: int
    kind: str
    start: int
    seed: int


def run_slots(run: dict, plan: SynthesisPlan) -> tuple[list[Slot], dict[str, int]]:
    """The slots of a run entry, and the pool positions after it."""
    position = dict(run["position"])
    slots = []
    for j, kind in enumerate(plan.allocate(run["num_cases"])):
        index = run["first"] + j
        slots.append(Slot(index, kind, position.get(kind, 0), _case_seed(run["request"]["seed"], index)))
        position[kind] = position.get(kind, 0) + 1
    return slots, position


def _propose(synthesizer: Synthesizer, pool: list[RawCase], slot: Slot, candidates: int,
             want_classes: tuple[int, ...] | None = None) -> list[Proposal]:
    """Up to ``candidates`` proposals on the first target from the slot's pool place on that can host a lesion."""
    for t in range(len(pool)):
        target = pool[(slot.start + t) % len(pool)]
        try:
            return synthesizer.propose_many(target, slot.kind, np.random.default_rng([slot.seed, t]), candidates,
                                            want_classes)
        except SynthesisSkipped:
            continue
    raise LeFusionError(f"no {slot.kind!r} target could be synthesized by {synthesizer.name}")


def choose_proposals(synthesizer: Synthesizer, pools: dict[str, list[RawCase]], slots: list[Slot],
                     plan: SynthesisPlan, labels: LesionLabels, totals: dict[str, int],
                     wanted: set[int]) -> dict[int, Proposal]:
    """The proposal of every slot in ``wanted``. With a target share the choice depends on the earlier slots'
    choices (from the lesion totals at the run's start), so every slot's candidates are drawn, in order; while a
    target label is below its share, new lesions are asked to hold it (the closest candidate is then chosen)."""
    if not plan.target_share:
        return {s.index: _propose(synthesizer, pools[s.kind], s, 1)[0] for s in slots if s.index in wanted}
    tracker = ShareTracker(labels, plan.target_share)
    tracker.totals.update({int(k): v for k, v in totals.items()})
    chosen = {}
    for slot in tqdm(slots, desc=f"drawing lesion masks ({plan.candidates} candidates per new-lesion case)",
                     unit="case"):
        new_lesions = slot.kind != "retexture"
        proposals = _propose(synthesizer, pools[slot.kind], slot, plan.candidates if new_lesions else 1,
                             tracker.below_target() if new_lesions else None)
        pick = proposals[tracker.pick([p.seg for p in proposals])]
        tracker.add(pick.seg)
        if slot.index in wanted:
            chosen[slot.index] = pick
    return chosen


def join_run(manifest: Manifest, store: CacheStore, request: dict, plan: SynthesisPlan, part_id: int,
             generators: list[dict]) -> dict:
    """The run this process works on: an unfinished run of the same request whose part has no live writer (a
    parallel part, or a killed run started again), else a new run appended to the cache."""
    for run in manifest.runs:
        done = sum(1 for c in manifest.cases.values() if c["run"] == run["id"])
        if run["request"] == request and done < run["num_cases"] and not store.alive(run["parts"].get(str(part_id))):
            run["parts"][str(part_id)] = token()
            return run
    run = {"id": len(manifest.runs), "request": request, "first": manifest.next_index,
           "num_cases": request["num_cases"], "position": dict(manifest.position),
           "totals": manifest.lesion_voxel_totals(), "parts": {str(part_id): token()}, "generators": generators}
    manifest.runs.append(run)
    manifest.next_index += run["num_cases"]
    manifest.position = run_slots(run, plan)[1]
    return run


def existing_manifest(ctx: DatasetContext, store: CacheStore) -> Manifest:
    """The manifest of the cache to add to, refused unless it matches these plans, fold and raw labels."""
    manifest = store.load()
    try:
        manifest.check_matches(ctx, ctx.split[0], store.folder)
    except LeFusionError as exc:
        raise LeFusionError(f"{exc} (use --overwrite to replace it)") from None
    return manifest


def open_manifest(ctx: DatasetContext, store: CacheStore, labels: LesionLabels, cases: list[RawCase]) -> Manifest:
    """Under the cache lock: the checked manifest of the cache, or a new one (not saved yet); removes the leftovers
    of gone writers."""
    store.remove_dead_leftovers()
    if store.exists():
        return existing_manifest(ctx, store)
    manifest = Manifest.for_context(ctx)
    manifest.lesion_labels = labels.to_dict()
    manifest.real_lesion_voxels = real_lesion_voxels(cases, labels)
    return manifest


def start_run(ctx: DatasetContext, store: CacheStore, overwrite: bool, request: dict, plan: SynthesisPlan,
              part_id: int, generators: list[dict], labels: LesionLabels,
              cases: list[RawCase]) -> tuple[dict, set[int]]:
    """Under the cache lock: (re)start the cache if needed, join or append a run; (run entry, slots done)."""
    with store.locked():
        if overwrite:
            store.clear()
        manifest = open_manifest(ctx, store, labels, cases)
        run = join_run(manifest, store, request, plan, part_id, generators)
        store.save(manifest)
    return run, {c["slot"] for c in manifest.cases.values() if c["run"] == run["id"]}


def prepare_synthesis(ctx: DatasetContext, labels: LesionLabels, method: str, plan: SynthesisPlan | None,
                      options: SynthesizerOptions, progress: bool = True,
                      load: Callable[[DatasetContext, str], RawCase] = load_raw_case,
                      ) -> tuple[list[RawCase], Synthesizer, dict[str, list[RawCase]], SynthesisPlan]:
    """Read the fold's training cases (with ``load``) and set up the synthesizer, its target pools and the checked
    plan."""
    cases = [load(ctx, i) for i in tqdm(sorted(ctx.split[0]), desc="reading training cases", unit="case",
                                                 disable=not progress)]
    if not any(np.isin(c.seg, labels.lesions).any() for c in cases):
        raise LeFusionError(f"no training case of fold {ctx.fold} contains a lesion label {list(labels.lesions)}")
    synthesizer = make_synthesizer(method, cases, labels, options)
    pools = _pools(cases, labels)
    plan = (plan or SynthesisPlan()).with_method_mix(synthesizer.kinds, {k: len(v) for k, v in pools.items()})
    plan.validate(labels)
    for kind in plan.mix:
        if kind not in synthesizer.kinds and plan.mix[kind] > 0:
            raise LeFusionError(f"method {method} cannot make {kind!r} cases (it makes {', '.join(synthesizer.kinds)})")
        if plan.mix[kind] > 0 and not pools[kind]:
            raise LeFusionError(f"no training case of fold {ctx.fold} can be a {kind!r} target "
                                f"({'no normal case' if kind == 'normal' else 'no case with lesions'})")
    return cases, synthesizer, pools, plan


def synthesize_cache(ctx: DatasetContext, labels: LesionLabels, method: str, num_cases: int, seed: int = 0,
                     cache_folder: Path | None = None, overwrite: bool = False,
                     plan: SynthesisPlan | None = None, options: SynthesizerOptions | None = None,
                     num_parts: int = 1, part_id: int = 0) -> tuple[Path, Manifest]:
    """Add ``num_cases`` synthetic variants of the fold's training cases, following ``plan``; with ``num_parts``
    > 1 only part ``part_id`` of them (the other parts, run anywhere at any time, make the rest)."""
    if num_cases < 1:
        raise LeFusionError(f"the number of synthetic cases must be >= 1, got {num_cases}")
    check_parts(num_parts, part_id)
    ctx.check_single_stage()
    options = with_shipped_generators(method, options or SynthesizerOptions(), labels, plan)
    store = CacheStore.for_context(ctx, cache_folder)
    store.check_folder()
    check_generator_files(method, options, labels)
    generators = generator_records(method, options)
    check_no_leak(generators, ctx.held_out_hashes(), ctx.fold, "refused")
    if not overwrite and store.exists():
        existing_manifest(ctx, store)  # refused before any work
    cases, synthesizer, pools, plan = prepare_synthesis(ctx, labels, method, plan, options)
    request = json.loads(json.dumps({
        "method": method, "num_cases": num_cases, "seed": seed, "mix": plan.mix, "target_share": plan.target_share,
        "candidates": plan.candidates, "num_parts": num_parts, "sampling": options.mode,
        "histogram_matching": options.histogram_matching, "generators": generator_paths(generators)},
        sort_keys=True))
    store.prepare()
    with store.writer():
        run, done = start_run(ctx, store, overwrite, request, plan, part_id, generators, labels, cases)
        slots = run_slots(run, plan)[0]
        size = getattr(synthesizer, "batch_size", 1)
        batches = part_of([slots[b:b + size] for b in range(0, len(slots), size)], num_parts, part_id)
        batches = [batch for batch in batches if any(s.index not in done for s in batch)]
        chosen = choose_proposals(synthesizer, pools, slots, plan, labels, run["totals"],
                                  {s.index for batch in batches for s in batch})
        todo = sum(s.index not in done for batch in batches for s in batch)
        with tqdm(total=todo, desc=f"synthesizing ({method}, run {run['id']}, part {part_id}/{num_parts})",
                  unit="case") as bar:
            for batch in batches:
                proposals = [chosen[s.index] for s in batch]
                rendered = synthesizer.render_many(proposals, np.random.default_rng(batch[0].seed))
                for slot, proposal, synthetic in zip(batch, proposals, rendered):
                    if slot.index not in done:
                        _store(ctx, store, run, slot, proposal, synthetic)
                        bar.update(1)
    return store.folder, store.load()


def _store(ctx: DatasetContext, store: CacheStore, run: dict, slot: Slot, proposal: Proposal, synthetic) -> None:
    """Store the case of an offline run's slot."""
    provenance = {"source": proposal.target.identifier, "seed": slot.seed, "run": run["id"], "slot": slot.index,
                  **synthetic.provenance}
    store_case(ctx, store, f"{proposal.target.identifier}__syn{slot.index:04d}", synthetic.case, provenance)


def store_case(ctx: DatasetContext, store: CacheStore, syn_id: str, case: RawCase, provenance: dict,
               pool_max: int | None = None) -> list[str]:
    """The one way a synthetic case enters a cache: preprocess it with nnU-Net and add it to ``store`` (see
    :meth:`CacheStore.add`; ``pool_max``: online mode's pool of the case's run); the retired identifiers."""
    data, seg, properties = preprocess_case(ctx, case)
    properties["lefusion"] = provenance
    return store.add(syn_id, data, seg, properties, ctx.configuration_manager.patch_size, provenance, pool_max)


def start_online_run(ctx: DatasetContext, store: CacheStore, labels: LesionLabels, cases: list[RawCase],
                     request: dict, generators: list[dict], part: int) -> tuple[Manifest, dict]:
    """Under the cache lock: open (or create) the cache for online synthesis and add this process's run entry (it
    records the generators, so later checks see them), whose pool adopts the online cases of runs whose writers
    are gone. The caller is a writer of ``store`` already. If no other writer is alive, case files the manifest
    does not list (a killed online run's) are deleted."""
    store.prepare()
    with store.locked():
        manifest = open_manifest(ctx, store, labels, cases)
        if not store.other_writers():
            store.remove_case_files(store.unlisted_cases(manifest))
        run = {"id": len(manifest.runs), "request": request, "first": manifest.next_index, "num_cases": 0,
               "position": {}, "totals": {}, "parts": {str(part): token()}, "generators": generators,
               "online": True}
        manifest.runs.append(run)
        store.adopt_orphaned_pools(manifest, run["id"])
        store.save(manifest)
    return manifest, run


def real_lesion_voxels(cases: list[RawCase], labels: LesionLabels) -> dict[str, int]:
    """Lesion voxels per label over real cases (raw grid)."""
    totals = {str(lab): 0 for lab in labels.lesions}
    for case in cases:
        for label, n in lesion_voxel_counts(case.seg, labels).items():
            totals[label] += n
    return totals
