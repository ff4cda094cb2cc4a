"""Semantic dedup (pipeline/semdedup.py) against a plain double loop written out here: the same rows
dropped, with the same representatives, on small sets."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.semdedup import brute_force, semantic_duplicates


def loop_reference(x: np.ndarray, position: np.ndarray, threshold: float, clusters: np.ndarray | None = None):
    """Row j is dropped when some row ranked before it (in its cluster) has cosine >= threshold; its
    representative is the best-ranked such row."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    dropped, representative = np.zeros(n, bool), np.full(n, -1)
    for j in range(n):
        for i in sorted(range(n), key=lambda r: position[r]):  # best-ranked first
            if position[i] >= position[j]:
                break
            if (clusters is None or clusters[i] == clusters[j]) and float(x[i] @ x[j]) >= threshold:
                dropped[j], representative[j] = True, i
                break
    return dropped, representative


def clustered_points(seed: int = 0, centers: int = 5, per_center: int = 30, dim: int = 32):
    """Well separated directions, each with a spread of points and some near-copies."""
    rng = np.random.default_rng(seed)
    c = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:centers] * 10
    points = np.repeat(c, per_center, axis=0) + rng.normal(size=(centers * per_center, dim)) * 2.0
    copies = points[rng.choice(len(points), 20, replace=False)] + rng.normal(size=(20, dim)) * 0.05
    x = np.concatenate([points, copies]).astype(np.float32)
    return x, rng.permutation(len(x))  # position: a random quality ranking


@pytest.mark.parametrize("threshold", [0.9, 0.97, 0.999])
def test_brute_force_equals_the_double_loop(threshold):
    x, position = clustered_points()
    ours = brute_force(x, position, threshold)
    dropped, representative = loop_reference(x, position, threshold)
    assert np.array_equal(ours.dropped, dropped) and np.array_equal(ours.representative, representative)
    assert 20 <= dropped.sum() < len(x), "the near-copies go, most rows stay"


def test_clustered_equals_brute_force_when_clusters_are_separated_and_the_loop_within_clusters_always():
    x, position = clustered_points(seed=1)
    clustered = semantic_duplicates(x, position, 0.97, n_clusters=5, seed=0)
    assert len(np.unique(clustered.clusters)) == 5
    assert np.array_equal(clustered.dropped, brute_force(x, position, 0.97).dropped)
    # on unstructured data clusters cut some pairs: the rule holds exactly within each cluster
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(200, 8)).astype(np.float32)
    rank = rng.permutation(200)
    got = semantic_duplicates(noise, rank, 0.9, n_clusters=6, seed=3)
    dropped, representative = loop_reference(noise, rank, 0.9, got.clusters)
    assert np.array_equal(got.dropped, dropped) and np.array_equal(got.representative, representative)
    assert got.dropped.sum() <= brute_force(noise, rank, 0.9).dropped.sum()


def test_blocks_do_not_change_the_result_and_bad_thresholds_are_refused():
    x, position = clustered_points(seed=4)
    whole = semantic_duplicates(x, position, 0.95, n_clusters=1)
    small_blocks = semantic_duplicates(x, position, 0.95, n_clusters=1, block=7)
    assert np.array_equal(whole.dropped, small_blocks.dropped)
    assert np.array_equal(whole.representative, small_blocks.representative)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        semantic_duplicates(x, position, 1.5)
    empty = semantic_duplicates(np.zeros((0, 4)), np.zeros(0, np.int64), 0.9)
    assert empty.dropped.shape == (0,)
