"""An imbalance-aware synthesis plan: which kind of synthetic case to make, and which proposal to keep.

Kinds (the paper's settings): ``retexture`` re-textures a pathological case's real lesions (P'), ``newmask`` puts
new lesion shapes on a pathological case, ``normal`` puts lesions on a normal case (N'). A target share per lesion
class (e.g. raise the rare no-reflow) is met by drawing several proposals per case and keeping the one that moves
the synthetic lesion-voxel shares closest to the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.labels import LesionLabels

KINDS = ("retexture", "newmask", "normal")
NEW_MASK_KINDS = ("newmask", "normal")  # kinds that need new lesion masks


def _parse_pairs(text: str, what: str) -> dict[str, float]:
    pairs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs[key.strip()] = float(value)
        except ValueError:
            raise LeFusionError(f"{what} must look like 'a=0.5,b=0.5', got {text!r}") from None
    return pairs


@dataclass
class SynthesisPlan:
    """Share of each kind among the synthetic cases (None: the kinds the method makes, ``with_method_mix``), and
    the wanted share of each lesion label's voxels."""

    mix: dict[str, float] | None = None
    target_share: dict[int, float] = field(default_factory=dict)
    candidates: int = 8

    @classmethod
    def parse(cls, mix: str | None, target_share: str | None, candidates: int = 8) -> "SynthesisPlan":
        """From command-line text: ``--mix retexture=0.5,normal=0.5 --target-share 4=0.2``."""
        plan = cls(candidates=candidates)
        if mix:
            plan.mix = _parse_pairs(mix, "--mix")
        if target_share:
            try:
                plan.target_share = {int(k): v for k, v in _parse_pairs(target_share, "--target-share").items()}
            except ValueError:
                raise LeFusionError(f"--target-share keys must be lesion labels, got {target_share!r}") from None
        return plan.validate()

    @property
    def new_masks(self) -> bool:
        """True when some of the cases get new lesion masks (and so need a mask generator)."""
        return any((self.mix or {}).get(kind, 0) > 0 for kind in NEW_MASK_KINDS)

    def with_method_mix(self, kinds: Sequence[str], pool_sizes: Mapping[str, int]) -> "SynthesisPlan":
        """This plan, its unset mix made what a method of ``kinds`` makes: retexture where the method can, else each
        of its kinds in proportion to the training cases it can take as targets (``pool_sizes``)."""
        if self.mix is not None:
            return self
        if "retexture" in kinds:
            return replace(self, mix={"retexture": 1.0})
        return replace(self, mix={k: float(pool_sizes[k]) for k in kinds if pool_sizes[k]})

    def validate(self, labels: LesionLabels | None = None) -> "SynthesisPlan":
        if self.mix is not None:
            shares = self.mix.values()
            if set(self.mix) - set(KINDS) or not self.mix or any(not 0 <= v < math.inf for v in shares) \
                    or sum(shares) <= 0:  # NaN too
                raise LeFusionError(f"--mix takes non-negative shares of {', '.join(KINDS)}, got {self.mix}")
        if any(not 0 < v < 1 for v in self.target_share.values()) or sum(self.target_share.values()) >= 1 + 1e-9:
            raise LeFusionError(f"--target-share values must lie in (0, 1) and sum to <= 1, got {self.target_share}")
        if labels is not None and set(self.target_share) - set(labels.lesions):
            raise LeFusionError(f"--target-share names labels {sorted(set(self.target_share) - set(labels.lesions))}"
                                f" that are not lesion labels {list(labels.lesions)}")
        if self.candidates < 1:
            raise LeFusionError(f"the number of candidates must be >= 1, got {self.candidates}")
        return self

    def allocate(self, num_cases: int) -> list[str]:
        """``num_cases`` kinds in the planned proportions (largest remainder), interleaved."""
        total = sum(self.mix.values())
        exact = {k: num_cases * v / total for k, v in self.mix.items() if v > 0}
        counts = {k: int(np.floor(v)) for k, v in exact.items()}
        for k in sorted(exact, key=lambda k: counts[k] - exact[k])[:num_cases - sum(counts.values())]:
            counts[k] += 1
        position = {k: (np.arange(n) + 0.5) / n for k, n in counts.items() if n}
        return [k for _, k in sorted((p, k) for k, ps in position.items() for p in ps)]

    def next_kind(self, made: dict[str, int]) -> str:
        """For a stream of cases (online synthesis): the kind of the next case, given how many of each kind were
        made; the kind furthest behind its planned share (ties in the order of :data:`KINDS`)."""
        total = sum(self.mix.values())
        n = sum(made.values()) + 1
        wanted = [k for k in KINDS if self.mix.get(k, 0) > 0]
        return max(wanted, key=lambda k: (n * self.mix[k] / total - made.get(k, 0), -KINDS.index(k)))


class ShareTracker:
    """Running lesion-voxel totals of the synthetic cases; picks the proposal closest to the target shares."""

    def __init__(self, labels: LesionLabels, target_share: dict[int, float]):
        self.labels = labels
        self.target = target_share
        self.totals = {lab: 0 for lab in labels.lesions}

    def counts(self, label_map: np.ndarray) -> dict[int, int]:
        return {lab: int(np.count_nonzero(label_map == lab)) for lab in self.labels.lesions}

    def _error(self, totals: dict[int, int]) -> float:
        n = sum(totals.values())
        return sum((totals[lab] / n - share) ** 2 for lab, share in self.target.items()) if n else 0.0

    def pick(self, label_maps: list[np.ndarray]) -> int:
        """Index of the proposal whose lesion voxels bring the totals closest to the target (first if no target)."""
        if not self.target or len(label_maps) == 1:
            return 0
        errors = []
        for label_map in label_maps:
            c = self.counts(label_map)
            errors.append(self._error({lab: self.totals[lab] + c[lab] for lab in self.totals}))
        return int(np.argmin(errors))

    def below_target(self) -> tuple[int, ...] | None:
        """The target labels still below their share (new lesions should hold them), or None."""
        shares = self.shares()
        below = tuple(lab for lab, share in self.target.items() if shares[lab] < share)
        return below or None

    def add(self, label_map: np.ndarray) -> None:
        for lab, n in self.counts(label_map).items():
            self.totals[lab] += n

    def shares(self) -> dict[int, float]:
        n = sum(self.totals.values())
        return {lab: (v / n if n else 0.0) for lab, v in self.totals.items()}
