"""Histogram condition: bins, normalisation, empty classes, official perturbation, clusters."""
import json

import numpy as np
import pytest
import torch

from nnunet_lefusion.diffusion.histograms import (
    HistogramClusters, choose_condition, class_histogram, cluster_histograms, lesion_histograms, match_histogram,
    organ_level, perturb_histogram, shift_histogram)
from nnunet_lefusion.errors import LeFusionError


def test_bin_edges_and_last_bin_includes_one():
    edges = -1 + 0.125 * np.arange(16)
    hist = class_histogram(np.concatenate([edges, [1.0]]))
    expected = np.full(16, 1 / 17)
    expected[15] = 2 / 17
    np.testing.assert_allclose(hist, expected, rtol=1e-6)
    assert class_histogram(np.array([-0.875 - 1e-9]))[0] == 1.0


def test_lesion_histograms_per_class_sum_one_and_empty_class_zero():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.3, 0.2, size=(4, 8, 8)), -1, 1)
    label = np.zeros((4, 8, 8), dtype=np.uint8)
    label[1:3, 2:6, 2:6] = 3
    cond = lesion_histograms(image, label, [3, 4])
    assert cond.shape == (32,) and cond.dtype == np.float32
    assert np.isfinite(cond).all()
    assert cond[:16].sum() == pytest.approx(1.0, abs=1e-6)
    assert (cond[16:] == 0).all()
    counts, _ = np.histogram(image[label == 3], bins=16, range=(-1, 1))
    np.testing.assert_allclose(cond[:16], counts / counts.sum(), rtol=1e-6)
    assert not np.isnan(lesion_histograms(image, np.zeros_like(label), [3, 4])).any()


def test_perturbation_matches_official_properties():
    hist = np.zeros(32, dtype=np.float32)
    hist[10:15] = [0.01, 0.29, 0.6, 0.08, 0.02]
    hist[26:28] = [0.067, 0.933]
    out = perturb_histogram(hist, np.random.default_rng(5))
    change = np.abs(out - hist)
    assert (out[hist == 0] == 0).all()
    assert (change <= 0.1 * np.abs(hist) + 1e-7).all()
    full = np.full(16, 1 / 16)
    full_change = np.abs(perturb_histogram(full, np.random.default_rng(2)) - full) / full
    assert full_change.max() == pytest.approx(0.1, rel=1e-4)
    assert not np.allclose(out, hist)
    np.testing.assert_array_equal(out, perturb_histogram(hist, np.random.default_rng(5)))
    assert not np.array_equal(out, perturb_histogram(hist, np.random.default_rng(6)))


def test_clusters_round_trip_and_choice():
    rng = np.random.default_rng(1)
    dark = [lesion_histograms(rng.uniform(-0.9, -0.5, (2, 4, 4)), np.full((2, 4, 4), 3), [3]) for _ in range(6)]
    bright = [lesion_histograms(rng.uniform(0.5, 0.9, (2, 4, 4)), np.full((2, 4, 4), 3), [3]) for _ in range(4)]
    clusters = cluster_histograms(np.stack(dark + bright), n_clusters=2, seed=0)
    assert sorted(clusters.counts) == [4, 6]
    restored = HistogramClusters.from_dict(json.loads(json.dumps(clusters.to_dict())))
    assert restored == clusters and restored.cond_dim == 16
    bright_idx = int(np.argmax([np.dot(c, np.arange(16)) for c in clusters.centers]))
    picked = choose_condition(clusters, np.random.default_rng(0), cluster=bright_idx, perturb=False)
    np.testing.assert_allclose(picked, clusters.centers[bright_idx], rtol=1e-6)
    assert picked[:8].sum() == 0
    drawn = choose_condition(clusters, np.random.default_rng(3))
    assert drawn.shape == (16,) and np.isfinite(drawn).all()
    given = np.eye(16, dtype=np.float32)[4]
    np.testing.assert_array_equal(choose_condition(clusters, np.random.default_rng(0), histogram=given), given)
    with pytest.raises(LeFusionError):
        choose_condition(clusters, np.random.default_rng(0), cluster=7)
    with pytest.raises(LeFusionError):
        choose_condition(clusters, np.random.default_rng(0), histogram=[0.5] * 8)


def test_random_cluster_has_a_histogram_for_every_class_the_mask_has():
    infarct_only = np.concatenate([np.eye(16)[12], np.zeros(16)])
    with_mvo = np.concatenate([np.eye(16)[12], np.eye(16)[3]])
    clusters = HistogramClusters([infarct_only.tolist(), with_mvo.tolist()], [99, 1])
    draws = [choose_condition(clusters, np.random.default_rng(seed), present=[True, True], perturb=False)
             for seed in range(20)]
    assert all(np.array_equal(d, with_mvo) for d in draws)  # the rare cluster, every time: MVO needs a histogram
    infarct_draws = [choose_condition(clusters, np.random.default_rng(seed), present=[True, False], perturb=False)
                     for seed in range(20)]
    assert sum(np.array_equal(d, infarct_only) for d in infarct_draws) >= 15  # by training counts
    few_mvo = np.concatenate([np.eye(16)[12], np.eye(16)[12] * 0.1])   # 1 member in 10 had MVO (as bright as MI)
    most_mvo = np.concatenate([np.eye(16)[12], np.eye(16)[3] * 0.6])   # 6 in 10 had it (dark)
    mostly = HistogramClusters([few_mvo.tolist(), most_mvo.tolist()], [99, 1])
    assert all(np.allclose(choose_condition(mostly, np.random.default_rng(seed), present=[True, True],
                                            perturb=False), most_mvo) for seed in range(20))
    only_infarct = HistogramClusters([infarct_only.tolist()], [1])  # nothing fits: the draw still succeeds
    assert np.array_equal(choose_condition(only_infarct, np.random.default_rng(0), present=[True, True],
                                           perturb=False), infarct_only)


def test_fewer_distinct_histograms_than_clusters_and_official_centres():
    same = np.tile(np.eye(16, dtype=np.float32)[3], (5, 1))
    assert len(cluster_histograms(same, n_clusters=4).centers) == 1
    official = HistogramClusters.from_official([[0.0] * 10 + [0.3, 0.7] + [0.0] * 4,
                                                [0.0] * 10 + [0.067, 0.933] + [0.0] * 4], num_classes=2)
    assert official.cond_dim == 32 and len(official.centers) == 1
    with pytest.raises(LeFusionError):
        cluster_histograms(np.zeros((0, 16)), 2)


def test_match_histogram_takes_the_target_distribution_and_keeps_the_order():
    values = torch.from_numpy(np.random.default_rng(0).normal(-0.2, 0.1, 3001)).float()  # grey, narrow
    target = torch.zeros(16)
    target[[11, 12, 14]] = torch.tensor([0.2, 0.5, 0.3])  # bright, with an empty bin in between
    matched = match_histogram(values, target * 7.0)  # the scale of the histogram does not matter
    np.testing.assert_allclose(class_histogram(matched.numpy()), target.numpy(), atol=1 / 3001)
    order = torch.argsort(values)
    assert (torch.diff(matched[order]) >= 0).all()  # the i-th smallest stays the i-th smallest
    assert matched.dtype == values.dtype and matched.min() >= 0.375 and matched.max() <= 1.0
    assert torch.equal(match_histogram(values, torch.zeros(16)), values)  # no target: unchanged
    assert match_histogram(values[:0], target).numel() == 0


def test_shifted_histograms_move_their_mass_and_keep_it():
    hist = np.concatenate([np.eye(16)[5] * 0.4 + np.eye(16)[6] * 0.6, np.eye(16)[15]]).astype(np.float32)
    np.testing.assert_allclose(shift_histogram(hist, 0.25), np.concatenate([
        np.eye(16)[7] * 0.4 + np.eye(16)[8] * 0.6, np.eye(16)[15]]), atol=1e-7)   # two bins up; the top stays
    half = shift_histogram(hist, -0.0625)                                           # half a bin down
    np.testing.assert_allclose(half[:16], [0] * 4 + [0.2, 0.5, 0.3] + [0] * 9, atol=1e-7)
    assert half[16:].sum() == pytest.approx(1.0) and half[30:].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(shift_histogram(hist, -3.0)[[0, 16]], [1.0, 1.0], atol=1e-7)   # all to the bottom
    np.testing.assert_array_equal(shift_histogram(hist, 0.0), hist)


def test_clusters_keep_their_organ_level_and_move_to_the_target_organ():
    rng = np.random.default_rng(4)
    organ = np.full((2, 4, 4), 2)
    organ[0] = 3
    images, levels = [], []
    for level in rng.uniform(-0.3, 0.3, size=12):   # lesions 0.25 above their organ, organs at varying levels
        image = np.where(organ == 3, level + 0.25, level) + rng.normal(0, 0.01, organ.shape)
        images.append(lesion_histograms(image, organ, [3]))
        levels.append(organ_level(image, organ, [2]))
    clusters = cluster_histograms(np.stack(images), n_clusters=2, seed=0, organ_levels=levels)
    assert len(clusters.organ_levels) == 2 and all(-0.3 < v < 0.3 for v in clusters.organ_levels)
    assert HistogramClusters.from_dict(json.loads(json.dumps(clusters.to_dict()))) == clusters
    centre = -1 + (np.arange(16) + 0.5) / 8   # bin centres
    for target in (-0.5, 0.0, 0.4):   # whichever cluster is drawn, the lesion lands 0.25 above the target organ
        for seed in range(4):
            hist = choose_condition(clusters, np.random.default_rng(seed), perturb=False, organ_level=target)
            assert float(np.dot(hist, centre)) == pytest.approx(target + 0.25, abs=0.07)
    unshifted = choose_condition(clusters, np.random.default_rng(0), cluster=0, perturb=False)
    np.testing.assert_allclose(unshifted, clusters.centers[0], rtol=1e-6)   # no target level: the centre as is
    assert np.isnan(organ_level(np.zeros((2, 2)), np.zeros((2, 2)), [2]))
    with pytest.raises(LeFusionError, match="one organ level per histogram"):
        cluster_histograms(np.stack(images), 2, organ_levels=levels[:3])
