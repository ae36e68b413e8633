"""Which target each synthetic case of a run is made from: the target pools, the run's slots with their seeds, and
the choice of proposals, in slot order, under a rare-class target share."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels
from nnunet_lefusion.synthesis.base import Proposal, RawCase, Synthesizer, SynthesisSkipped
from nnunet_lefusion.synthesis.plan import ShareTracker, SynthesisPlan


def _case_seed(seed: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{index}".encode())

def target_pools(cases: list[RawCase], labels: LesionLabels) -> dict[str, list[RawCase]]:
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
