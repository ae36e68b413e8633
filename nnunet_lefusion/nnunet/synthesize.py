"""Fill a synthetic cache: raw training cases -> synthesizer -> nnU-Net's preprocessor -> Blosc2 cache.

A run reserves, under the cache lock, the case numbers ``first .. first + n`` and the places in the target pools
where it starts (appending continues where the last run stopped). Everything else follows from the run's entry:
case ``i`` is made from seed ``(seed, i)``, and the cases are rendered in fixed batches of ``batch_size``. So
``-num_parts N -part_id p`` (part ``p`` renders batches ``p, p + N, ...``) gives the same cases as one run, and a
killed run, started again with the same command, takes over its part and makes only the missing cases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.nnunet.cache import Manifest
from nnunet_lefusion.nnunet.cache_runs import existing_manifest, start_run, store_case
from nnunet_lefusion.nnunet.cache_store import CacheStore
from nnunet_lefusion.nnunet.context import DatasetContext, check_parts, part_of
from nnunet_lefusion.nnunet.generators import (SynthesizerOptions, check_generator_files, generator_paths,
                                               generator_records, make_synthesizer, with_shipped_generators)
from nnunet_lefusion.nnunet.provenance import check_no_leak
from nnunet_lefusion.nnunet.preprocess import load_raw_case
from nnunet_lefusion.nnunet.slots import Slot, choose_proposals, run_slots, target_pools
from nnunet_lefusion.synthesis.base import Proposal, RawCase, Synthesizer
from nnunet_lefusion.synthesis.plan import SynthesisPlan


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
    pools = target_pools(cases, labels)
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
        "candidates": plan.candidates, "num_parts": num_parts, **options.sampling_record(),
        "generators": generator_paths(generators)},
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
