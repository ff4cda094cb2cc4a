"""Semantic near-duplicates on stored image embeddings, SemDeDup-style (Abbas et al. 2023, "SemDeDup:
Data-efficient learning at web-scale through semantic deduplication"): cluster the L2-normalised
embeddings with k-means, then inside each cluster drop every row whose cosine similarity to a row ranked
before it (better quality) is at least ``threshold``. pHash catches the same picture re-encoded or
resized; this catches the same scene shot twice, crops and edits that pHash misses.

Exact within a cluster (the paper's rule: a row goes when its largest similarity to the better-ranked rows
of its cluster reaches the threshold), approximate across clusters, as in the paper: two near-identical
rows split by a cluster boundary both stay. ``brute_force`` is the same rule without clusters, for tests
and small sets. Memory: the centroids are fitted on a seeded sample (``fit_rows``), rows are assigned in
chunks, and the pairwise work is per cluster in blocks, so the peak is one cluster's block, not n².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SemanticDuplicates:
    """``dropped``: rows to remove; ``representative``: for each dropped row, the best-ranked row of its
    cluster it duplicates (-1 for kept rows); ``clusters``: the k-means label of every row."""

    dropped: np.ndarray
    representative: np.ndarray
    clusters: np.ndarray


def normalise(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def kmeans_labels(x: np.ndarray, n_clusters: int, seed: int = 0, fit_rows: int = 100_000,
                  chunk: int = 65_536) -> np.ndarray:
    """Cluster labels of the rows of ``x`` (normalised): centroids by scipy's k-means++ / Lloyd on a
    seeded sample of at most ``fit_rows`` rows (spherical: centroids renormalised), then every row goes
    to its most similar centroid, chunk by chunk."""
    from scipy.cluster.vq import kmeans2

    n = len(x)
    k = max(1, min(n_clusters, n))
    if k == 1:
        return np.zeros(n, np.int64)
    rng = np.random.default_rng(seed)
    sample = x if n <= fit_rows else x[np.sort(rng.choice(n, fit_rows, replace=False))]
    centroids, _ = kmeans2(sample.astype(np.float64), k, minit="++", seed=rng, iter=20)
    centroids = normalise(centroids)
    labels = np.empty(n, np.int64)
    for start in range(0, n, chunk):
        labels[start:start + chunk] = np.argmax(x[start:start + chunk] @ centroids.T, axis=1)
    return labels


def semantic_duplicates(embeddings: np.ndarray, position: np.ndarray, threshold: float, n_clusters: int | None = None,
                        seed: int = 0, block: int = 2048) -> SemanticDuplicates:
    """Rows of ``embeddings`` (n, d) to drop as semantic duplicates. ``position``: each row's rank
    (0 = best; the selection's priority order), ``threshold``: cosine similarity at or above which a
    row duplicates a better-ranked one. ``n_clusters`` default: about one cluster per 1,000 rows."""
    if not 0 < threshold <= 1:
        raise ValueError(f"semantic duplicate threshold must be in (0, 1], got {threshold}")
    x = normalise(embeddings)
    n = len(x)
    dropped = np.zeros(n, bool)
    representative = np.full(n, -1, np.int64)
    if n == 0:
        return SemanticDuplicates(dropped, representative, np.zeros(0, np.int64))
    k = n_clusters if n_clusters is not None else max(1, n // 1000)
    labels = kmeans_labels(x, k, seed)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        members = members[np.argsort(position[members], kind="stable")]  # best first
        _mark_in_order(x, members, threshold, block, dropped, representative)
    return SemanticDuplicates(dropped, representative, labels)


def brute_force(embeddings: np.ndarray, position: np.ndarray, threshold: float) -> SemanticDuplicates:
    """The same rule over all pairs (one cluster): O(n²), for tests and small sets."""
    return semantic_duplicates(embeddings, position, threshold, n_clusters=1)


def _mark_in_order(x: np.ndarray, members: np.ndarray, threshold: float, block: int, dropped: np.ndarray,
                   representative: np.ndarray) -> None:
    """``members`` best first: each one against every earlier member, in column blocks (memory: block x
    len(members)); a hit points at the earliest (best-ranked) close member."""
    vectors = x[members]
    for start in range(0, len(members), block):
        cols = vectors[start:start + block]
        sims = vectors[:start + len(cols)] @ cols.T  # earlier-or-same rows x this block
        # only rows ranked strictly before each column count
        earlier = np.arange(start + len(cols))[:, None] < (start + np.arange(len(cols)))[None, :]
        close = earlier & (sims >= threshold)
        hit = close.any(axis=0)
        first = np.argmax(close, axis=0)  # the best-ranked row it duplicates
        rows = members[start:start + len(cols)]
        dropped[rows[hit]] = True
        representative[rows[hit]] = members[first[hit]]
