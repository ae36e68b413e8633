"""One rank's online-synthesis budget: how many cases it makes per epoch, and when (at most one per training step).

This is the rank logic of online mode, apart from any synthesis so that it can be driven by real processes in tests:

* A rank's share of ``cases_per_epoch`` is ``n // world + (rank < n % world)``; a rank whose share is 0 (``n`` smaller
  than the world) makes nothing. With ``cases_per_epoch`` 0 only the time share limits every rank.
* The share is spread over the epoch: after step ``i`` of ``I`` a rank has tried ``ceil(share * i / I)`` cases, but
  it starts at most ONE case per training step, so the time a rank adds to a step is bounded by one case and no rank
  stalls the others in DDP for more than that. A case that takes longer than ``case_limit_s`` (half of the process
  group's timeout) stops the rank's synthesis for the rest of the training: the next one could kill the job.
* With ``time_share`` ``s`` > 0 a case is started only while this epoch's synthesis time, plus the mean time of a
  case, stays within ``s`` of the epoch's synthesis + training-step time. Cases skipped are not made up later.
* A failed case (out of memory, full disk, a sampler error) counts as tried: it is not retried, and :func:`unreachable`
  says when failures leave the share unreached.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

T = TypeVar("T")


def rank_share(cases_per_epoch: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of ``cases_per_epoch`` cases over ``world_size`` ranks (the shares sum to the whole)."""
    return cases_per_epoch // world_size + (1 if rank < cases_per_epoch % world_size else 0)


@dataclass
class RankBudget:
    """One rank's budget (see the module documentation); the producer asks :meth:`case_due` after each step."""

    cases_per_epoch: int
    time_share: float = 0.0
    rank: int = 0
    world_size: int = 1
    case_limit_s: float = math.inf
    share: int | None = field(init=False)   # None: no case count, only the time share
    stopped: str | None = field(init=False, default=None)   # why this rank makes no more cases

    def __post_init__(self) -> None:
        self.share = rank_share(self.cases_per_epoch, self.world_size, self.rank) if self.cases_per_epoch else None
        self.made_total, self.synthesis_total = 0, 0.0
        self.epoch_start()

    def epoch_start(self) -> None:
        self.made, self.failed = 0, 0
        self.synthesis_time, self.train_time = 0.0, 0.0
        self._last_due_step = 0

    @property
    def tried(self) -> int:
        return self.made + self.failed

    @property
    def idle(self) -> bool:
        """Whether this rank never makes a case (its share is 0, or it was stopped)."""
        return self.share == 0 or self.stopped is not None

    def add_step(self, seconds: float) -> None:
        """Count one training step's time."""
        self.train_time += seconds

    def case_due(self, steps_done: int, steps_per_epoch: int) -> bool:
        """Whether to start one case now, after step ``steps_done`` of ``steps_per_epoch`` (once per step at most)."""
        if self.idle or steps_done <= self._last_due_step:
            return False
        if self.share is not None and self.tried >= math.ceil(self.share * steps_done / max(steps_per_epoch, 1)):
            return False
        if not self._within_time():
            return False
        self._last_due_step = steps_done
        return True

    def _within_time(self) -> bool:
        if self.time_share <= 0:
            return True
        estimate = self.synthesis_total / self.made_total if self.made_total else 0.0
        spent = self.synthesis_time + estimate
        return spent <= self.time_share * (spent + self.train_time)

    def attempt(self, make: Callable[[], T], log: Callable[[str], None]) -> T | None:
        """Call ``make`` (one case) and count it; a failure (out of memory, full disk, a sampler error) is logged
        and gives None: the case is skipped and the training goes on."""
        t0 = time.perf_counter()
        made = None
        try:
            made = make()
        except Exception as exc:  # noqa: BLE001 (any failure of one case; KeyboardInterrupt and exits pass)
            reason = (str(exc).splitlines() or [""])[0][:300]
            log(f"LeFusion online: rank {self.rank}: a case failed and was skipped ({type(exc).__name__}: {reason})")
        self.record(time.perf_counter() - t0, made is not None)
        if self.stopped:
            log(f"LeFusion online: rank {self.rank} makes no more cases: {self.stopped}")
        return made

    def record(self, seconds: float, ok: bool) -> None:
        """Count one case tried: made (``ok``) or failed, and the time it took."""
        self.synthesis_time += seconds
        if ok:
            self.made += 1
            self.made_total += 1
            self.synthesis_total += seconds
        else:
            self.failed += 1
        if seconds > self.case_limit_s:
            self.stopped = (f"one case took {seconds:.0f} s, more than {self.case_limit_s:.0f} s (half of the DDP "
                            f"timeout): the next could end the training")


def unreachable(made: int, failed: int, target: int | None) -> str | None:
    """The line to log when an epoch's budget (counts summed over the ranks) was not reached, else None: failed
    cases, or a share larger than the training steps (one case per step at most)."""
    if target is None or made >= target:
        return None
    rate = failed / (made + failed) if made + failed else 0.0
    return (f"LeFusion online: {made} of the budget of {target} case(s) made this epoch; {failed} failed "
            f"({rate:.0%}): at this failure rate and one case per training step at most, the budget is unreachable")
