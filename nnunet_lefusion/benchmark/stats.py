"""Statistics over a (test case x seed) table: bootstrap intervals of a mean and a paired sign-flip test."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP = 10_000


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % bootstrap interval, the number of (case, seed) values behind it and, for a paired
    difference, the two-sided p-value of the sign-flip test."""

    mean: float
    low: float
    high: float
    n: int
    p: float | None = None

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where a row has nothing."""
    counts = np.isfinite(values).sum(axis=-1)
    sums = np.nansum(values, axis=-1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def bootstrap(values: np.ndarray, seed: int = 0, rounds: int = BOOTSTRAP) -> Estimate:
    """Mean of a (cases, seeds) table (NaN = no value) with a 95 % interval from resampling both cases and seeds."""
    values = np.asarray(values, dtype=float).reshape(len(values), -1)
    n = int(np.isfinite(values).sum())
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    cases = rng.integers(0, values.shape[0], size=(rounds, values.shape[0]))
    seeds = rng.integers(0, values.shape[1], size=(rounds, values.shape[1]))
    resampled = values[cases[:, :, None], seeds[:, None, :]].reshape(rounds, -1)
    means = _nanmean_rows(resampled)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return Estimate(float(np.nanmean(values)), float(low), float(high), n)


def paired(arm: np.ndarray, control: np.ndarray, seed: int = 0, rounds: int = BOOTSTRAP) -> Estimate:
    """Mean paired difference arm - control over (case, seed) pairs with both values, its bootstrap interval, and
    the sign-flip permutation p-value over cases (each case's differences flipped together across seeds)."""
    diff = np.asarray(arm, dtype=float) - np.asarray(control, dtype=float)
    estimate = bootstrap(diff, seed, rounds)
    per_case = _nanmean_rows(diff.reshape(len(diff), -1))
    per_case = per_case[np.isfinite(per_case)]
    if per_case.size == 0:
        return estimate
    signs = np.random.default_rng(seed + 1).choice((-1.0, 1.0), size=(rounds, per_case.size))
    observed = abs(per_case.mean())
    p = (1 + np.count_nonzero(np.abs((signs * per_case).mean(axis=1)) >= observed - 1e-12)) / (rounds + 1)
    return Estimate(estimate.mean, estimate.low, estimate.high, estimate.n, float(p))
