"""Statistics over a (test case x seed) table: bootstrap intervals of a mean and a paired sign-flip test."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

BOOTSTRAP = 10_000


def _json_ready(self) -> dict:
    """A figure's fields as a dict for JSON, NaN as None."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % bootstrap interval, the number of (case, seed) values behind it and, for a paired
    difference, the two-sided p-value of the sign-flip test."""

    mean: float
    low: float
    high: float
    n: int
    p: float | None = None

    to_dict = _json_ready


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


@dataclass(frozen=True)
class RunLevel:
    """A figure whose unit is the trained model: one value per run, their mean with a 95 % t-interval across runs
    and a hierarchical bootstrap interval (runs resampled, then cases within each run); for a paired difference to
    the control also the paired t-test's two-sided p-value over runs."""

    per_run: list[float | None]
    mean: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    runs: int
    p: float | None = None

    to_dict = _json_ready


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``values`` (NaN skipped) and its 95 % Student-t interval; the interval is NaN for fewer than 2."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return mean, mean - half, mean + half


def _hierarchical(values: np.ndarray, control: np.ndarray | None, seed: int, rounds: int) -> tuple[float, float]:
    """95 % interval of the mean over runs of per-run case means (minus the control's, on the same resampled cases),
    resampling runs and then cases within each run (tables: cases x runs, NaN = no value)."""
    n_cases, n_runs = values.shape
    if n_runs < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(rounds)
    for b in range(rounds):
        runs = rng.integers(0, n_runs, size=n_runs)
        cases = rng.integers(0, n_cases, size=(n_runs, n_cases))
        picked = values[cases, runs[:, None]]
        per_run = _nanmean_rows(picked)
        if control is not None:
            per_run = per_run - _nanmean_rows(control[cases, runs[:, None]])
        means[b] = np.nanmean(per_run) if np.isfinite(per_run).any() else np.nan
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return float(low), float(high)


def run_level_values(per_run: np.ndarray, control: np.ndarray | None = None) -> RunLevel:
    """Run-level estimate of one value per run (NaN = none), or of its paired difference to ``control``'s runs (the
    arms of a run share its training and test cases): mean, 95 % t-interval and the paired t-test's p-value."""
    per_run = np.asarray(per_run, dtype=float)
    if control is not None:
        per_run = per_run - np.asarray(control, dtype=float)
    mean, low, high = t_interval(per_run)
    finite = per_run[np.isfinite(per_run)]
    p = None
    if control is not None and finite.size >= 2:
        from scipy import stats

        p = float(stats.ttest_1samp(finite, 0.0).pvalue) if finite.std() > 0 else float(finite[0] == 0)
    return RunLevel([float(v) if np.isfinite(v) else None for v in per_run], mean, low, high, math.nan, math.nan,
                    int(finite.size), p)


def run_level(values: np.ndarray, control: np.ndarray | None = None, seed: int = 0,
              rounds: int = 2_000) -> RunLevel:
    """:func:`run_level_values` of a (cases x runs) table of per-case values (a run's value: its case mean), or of
    the paired difference of run values to the ``control``'s table of the same shape (each run's mean minus the
    control run's mean, so a case that has a value in one arm only still counts in it), with the hierarchical
    bootstrap interval."""
    values = np.asarray(values, dtype=float).reshape(len(values), -1)
    control = None if control is None else np.asarray(control, dtype=float).reshape(values.shape)
    estimate = run_level_values(_nanmean_rows(values.T), None if control is None else _nanmean_rows(control.T))
    low, high = _hierarchical(values, control, seed, rounds)
    return replace(estimate, boot_low=low, boot_high=high)
