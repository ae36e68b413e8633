"""Per-class lesion intensity histograms (the LeFusion texture condition) and their clusters."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nnunet_lefusion.errors import LeFusionError

NUM_BINS = 16
PERTURB_FRACTION = 0.1


def class_histogram(values: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Histogram of ``values`` (in [-1, 1]) over ``num_bins`` equal bins, normalised to sum 1.

    Bin k is [-1 + k w, -1 + (k+1) w) with w = 2 / num_bins; the last bin includes 1; values outside [-1, 1]
    are clipped into the end bins. No values gives all zeros.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return np.zeros(num_bins, dtype=np.float32)
    index = np.clip(np.floor((np.clip(values, -1.0, 1.0) + 1.0) * (num_bins / 2.0)), 0, num_bins - 1)
    counts = np.bincount(index.astype(np.int64), minlength=num_bins)
    return (counts / values.size).astype(np.float32)


def lesion_histograms(image: np.ndarray, label: np.ndarray, lesion_labels: Sequence[int],
                      num_bins: int = NUM_BINS) -> np.ndarray:
    """The condition vector: per lesion class, the histogram of ``image`` under ``label == class``, concatenated.

    ``image`` is the ROI mapped to [-1, 1]; the result has ``num_bins * len(lesion_labels)`` float32 values.
    """
    image = np.asarray(image)
    label = np.asarray(label)
    if image.shape != label.shape:
        raise LeFusionError(f"image {image.shape} and label {label.shape} shapes differ.")
    return np.concatenate([class_histogram(image[label == v], num_bins) for v in lesion_labels])


def organ_level(image: np.ndarray, label: np.ndarray, organ_labels: Sequence[int]) -> float:
    """The median of ``image`` (in [-1, 1]) over the healthy organ (``label`` in ``organ_labels``); NaN without
    it. Lesion intensities follow their organ's (on the phantom their medians correlate at 0.94-0.98 across
    cases), so a histogram drawn for another case is moved by the difference of the two levels."""
    values = np.asarray(image)[np.isin(label, list(organ_labels))]
    return float(np.median(values)) if values.size else float("nan")


def shift_histogram(hist: np.ndarray, shift: float, num_bins: int = NUM_BINS) -> np.ndarray:
    """Each ``num_bins`` block of ``hist`` moved by ``shift`` along [-1, 1]: a bin's mass is split between the two
    bins it lands on, and what would leave the range stays in the end bins (the total is kept)."""
    blocks = np.asarray(hist, dtype=np.float64).reshape(-1, num_bins)
    offset = shift * num_bins / 2.0
    base, fraction = int(np.floor(offset)), offset - np.floor(offset)
    moved = np.zeros_like(blocks)
    for step, weight in ((base, 1.0 - fraction), (base + 1, fraction)):
        for k in range(num_bins):
            moved[:, min(max(k + step, 0), num_bins - 1)] += weight * blocks[:, k]
    return moved.ravel().astype(np.float32)


def match_histogram(values: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """``values`` (1D) moved onto the distribution of ``hist`` (bins over [-1, 1] as in ``class_histogram``),
    keeping their order: the i-th smallest value becomes the (i + 1/2)/n quantile of ``hist`` read as uniform
    within each bin. The histogram need not be normalised; an empty one (sum 0) leaves the values unchanged.
    """
    hist = hist.to(values.device, torch.float64).clamp_min(0.0)
    total = hist.sum()
    if values.numel() == 0 or not total > 0:
        return values.clone()
    num_bins = hist.numel()
    cdf = torch.cat((hist.new_zeros(1), torch.cumsum(hist / total, 0)))
    quantiles = (torch.arange(values.numel(), device=values.device, dtype=torch.float64) + 0.5) / values.numel()
    index = (torch.searchsorted(cdf, quantiles, right=True) - 1).clamp(0, num_bins - 1)
    within = ((quantiles - cdf[index]) / (hist[index] / total).clamp_min(1e-12)).clamp(0.0, 1.0)
    out = torch.empty_like(values)
    out[torch.argsort(values, stable=True)] = (-1.0 + (index + within) * (2.0 / num_bins)).to(values.dtype)
    return out


def perturb_histogram(hist: np.ndarray, rng: np.random.Generator, fraction: float = PERTURB_FRACTION,
                      num_bins: int = NUM_BINS) -> np.ndarray:
    """Official ``perturb_tensor`` applied to each ``num_bins`` block of ``hist``.

    Per block: delta ~ N(0, 1), minus its mean, divided by its largest magnitude and multiplied by
    ``fraction * |h|`` bin-wise; returns h + delta. So every bin moves by at most ``fraction`` of itself, the
    bin with the largest draw moves by exactly that much, empty bins stay empty, and nothing is renormalised.
    """
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 1 or hist.size % num_bins:
        raise LeFusionError(f"a histogram condition must be a flat multiple of {num_bins} values, got {hist.shape}.")
    blocks = hist.reshape(-1, num_bins)
    delta = rng.standard_normal(blocks.shape)
    delta -= delta.mean(axis=1, keepdims=True)
    delta /= np.maximum(np.abs(delta).max(axis=1, keepdims=True), 1e-12)
    return (blocks + delta * fraction * np.abs(blocks)).ravel().astype(np.float32)


@dataclass
class HistogramClusters:
    """K-means centres of training conditions, kept as plain lists so they fit in checkpoint metadata;
    ``organ_levels``: per cluster, the mean ``organ_level`` of its members (None: not recorded)."""

    centers: list[list[float]]
    counts: list[int]
    num_bins: int = NUM_BINS
    organ_levels: list[float] | None = None

    @property
    def cond_dim(self) -> int:
        return len(self.centers[0])

    def to_dict(self) -> dict:
        levels = None if self.organ_levels is None else list(map(float, self.organ_levels))
        return {"centers": [list(map(float, c)) for c in self.centers], "counts": list(map(int, self.counts)),
                "num_bins": int(self.num_bins), "organ_levels": levels}

    @classmethod
    def from_dict(cls, d: dict) -> "HistogramClusters":
        levels = d.get("organ_levels")
        return cls([list(map(float, c)) for c in d["centers"]], [int(n) for n in d["counts"]],
                   int(d.get("num_bins", NUM_BINS)), None if levels is None else [float(v) for v in levels])

    @classmethod
    def from_official(cls, centers: Sequence[Sequence[float]], num_classes: int) -> "HistogramClusters":
        """Clusters from an official ``hist_clusters/*.json`` ``[0]['centers']`` list.

        With several lesion classes (Emidec), the official centres are one histogram per class, all used
        together: they become a single cluster. With one class (LIDC), each centre is its own cluster.
        """
        rows = [list(map(float, c)) for c in centers]
        if num_classes > 1:
            if len(rows) != num_classes:
                raise LeFusionError(f"expected {num_classes} official centres (one per class), got {len(rows)}.")
            return cls([[v for row in rows for v in row]], [1])
        return cls(rows, [1] * len(rows))


def read_official_clusters(path: str | os.PathLike, num_classes: int) -> HistogramClusters:
    """The clusters of an official ``hist_clusters/{data_type}_clusters.json`` file: a JSON list whose first entry
    holds ``centers``, one ``NUM_BINS``-bin histogram per centre (``HistogramClusters.from_official``: with
    ``num_classes`` > 1, as Emidec's two, centre k is the histogram of lesion class k, all used together).
    ``LeFusionError`` for a file that is missing, not JSON or not in that format."""
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LeFusionError(f"cannot read the histogram clusters {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError):
        raise LeFusionError(f"the histogram clusters {path} are not JSON") from None
    centers = loaded[0].get("centers") if isinstance(loaded, list) and loaded and isinstance(loaded[0], dict) else None
    if not isinstance(centers, list) or not centers or not all(
            isinstance(c, list) and len(c) == NUM_BINS and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and math.isfinite(v) and v >= 0 for v in c)
            for c in centers):
        raise LeFusionError(f"{path} is not an official histogram-cluster file: expected [{{\"centers\": [[{NUM_BINS} "
                            f"non-negative numbers], ...]}}] (hist_clusters/emidec_clusters.json of LeFusion)")
    try:
        return HistogramClusters.from_official(centers, num_classes)
    except LeFusionError as exc:
        raise LeFusionError(f"{path}: {exc}") from None


def cluster_histograms(histograms: np.ndarray, n_clusters: int, seed: int = 0,
                       organ_levels: Sequence[float] | None = None) -> HistogramClusters:
    """K-means (scikit-learn, 10 restarts) of training conditions (N, cond_dim), with the mean of each cluster's
    ``organ_levels`` (one per histogram) when given.

    ``n_clusters`` is lowered to the number of distinct histograms when there are fewer.
    """
    from sklearn.cluster import KMeans

    histograms = np.asarray(histograms, dtype=np.float64)
    if histograms.ndim != 2 or histograms.shape[0] == 0:
        raise LeFusionError(f"need a non-empty (N, cond_dim) array of histograms to cluster, got {histograms.shape}.")
    k = min(int(n_clusters), len(np.unique(histograms, axis=0)))
    if k < 1:
        raise LeFusionError(f"the number of histogram clusters must be >= 1, got {n_clusters}.")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(histograms)
    counts = np.bincount(km.labels_, minlength=k)
    levels = None
    if organ_levels is not None:
        levels = np.asarray(organ_levels, dtype=np.float64)
        if levels.shape != (len(histograms),):
            raise LeFusionError(f"need one organ level per histogram ({len(histograms)}), got {levels.shape}.")
        levels = [float(np.nanmean(levels[km.labels_ == c])) for c in range(k)]
    return HistogramClusters(km.cluster_centers_.tolist(), counts.tolist(), organ_levels=levels)


def choose_condition(clusters: HistogramClusters, rng: np.random.Generator, cluster: int | None = None,
                     histogram: Sequence[float] | None = None, perturb: bool = True,
                     present: Sequence[bool] | None = None, organ_level: float | None = None) -> np.ndarray:
    """The condition for one sampling call (float32, cond_dim values).

    ``histogram`` given: used as is. ``cluster`` given: that centre. Neither: a cluster drawn with probability
    proportional to its training count, among those where most members had every class flagged in ``present`` (the
    classes the lesion mask has; all clusters if none qualifies): a class's mass in a centre is the share of its
    members that had the class, and a centre where few had it carries a histogram of those few alone (on the
    phantom: the no-reflow of one infarct-only-like cluster was as bright as its infarct). ``organ_level`` (the
    target's ``organ_level``): a chosen centre is moved by its difference to the cluster's own level, so the lesion
    keeps the cluster's contrast to its organ rather than its absolute intensity (where the clusters record levels).
    A chosen centre is then perturbed by +-10 % (official) unless ``perturb`` is False.
    """
    if histogram is not None:
        hist = np.asarray(histogram, dtype=np.float32)
        if hist.shape != (clusters.cond_dim,) or not np.isfinite(hist).all() or (hist < 0).any():
            raise LeFusionError(f"a histogram condition needs {clusters.cond_dim} finite non-negative values.")
        return hist
    if cluster is None:
        p = np.asarray(clusters.counts, dtype=np.float64)
        if present is not None:
            blocks = np.asarray(clusters.centers).reshape(len(p), -1, clusters.num_bins).sum(axis=2)
            fits = (blocks >= 0.5)[:, np.asarray(present, dtype=bool)].all(axis=1)
            p = p * fits if (p * fits).sum() > 0 else p
        cluster = int(rng.choice(len(p), p=p / p.sum()))
    if not 0 <= cluster < len(clusters.centers):
        raise LeFusionError(f"histogram cluster {cluster} does not exist (there are {len(clusters.centers)}).")
    center = np.asarray(clusters.centers[cluster], dtype=np.float32)
    if organ_level is not None and clusters.organ_levels is not None:
        shift = organ_level - clusters.organ_levels[cluster]
        center = shift_histogram(center, shift, clusters.num_bins) if np.isfinite(shift) else center
    return perturb_histogram(center, rng, num_bins=clusters.num_bins) if perturb else center
