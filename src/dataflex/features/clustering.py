"""ClusterLESS's clustering: k-means with k-means++ initialisation and a convergence tolerance (scikit-learn;
DataFlex ran randomly initialised Lloyd iterations for a fixed count), representatives nearest to each centroid,
and a budget spread over clusters in score order so that one huge cluster cannot take the whole selection (in
DataFlex it could, and ties decided which rows of the last cluster were kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dataflex.core.errors import ConfigError, DataError


def kmeans(
    embeddings: torch.Tensor | np.ndarray, n_clusters: int, *, seed: int = 0, tol: float = 1e-4, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64, centroids [K, d]) of Lloyd k-means from a seeded k-means++ start; K = min(n_clusters, N)."""
    from sklearn.cluster import KMeans

    x = np.ascontiguousarray(
        embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float64
    )
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"k-means needs a non-empty [N, d] matrix, got shape {x.shape}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ConfigError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if not tol >= 0:
        raise ConfigError(f"k-means tol must be >= 0, got {tol!r}")
    k = min(n_clusters, len(x))
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, tol=tol, max_iter=max_iter, random_state=seed)
    labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_


def ranked_members(embeddings: torch.Tensor | np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> list[list[int]]:
    """Per cluster, its rows from nearest to farthest from the centroid (ties to the lower row)."""
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    out = []
    for c in range(len(centroids)):
        rows = np.where(labels == c)[0]
        d = np.linalg.norm(x[rows] - centroids[c], axis=1)
        out.append(rows[np.lexsort((rows, d))].tolist())
    return out


def spread_budget(
    cluster_order: Sequence[int], members: Sequence[Sequence[int]], budget: int, max_cluster_share: float = 0.5
) -> list[int]:
    """`budget` rows: clusters in `cluster_order` (best first), each giving at most ceil(max_cluster_share · budget)
    rows (its most central first) per pass; passes repeat until the budget is met or every row is taken."""
    if not 0 < max_cluster_share <= 1:
        raise ConfigError(f"max_cluster_share must be in (0, 1], got {max_cluster_share!r}")
    total = sum(len(members[c]) for c in cluster_order)
    budget = min(budget, total)
    cap = max(1, math.ceil(max_cluster_share * budget))
    taken = [0] * len(members)
    out: list[int] = []
    while len(out) < budget:
        for c in cluster_order:
            room = min(cap, len(members[c]) - taken[c], budget - len(out))
            if room > 0:
                out.extend(members[c][taken[c] : taken[c] + room])
                taken[c] += room
            if len(out) >= budget:
                break
    return out
