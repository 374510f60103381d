"""ClusterLESS's clustering: the partition of the pool, each cluster's representatives, and a budget spread over
clusters in score order so that one huge cluster cannot take the whole selection (in DataFlex it could, and ties
decided which rows of the last cluster were kept).

Methods (`clustering_method`, DataFlex's names and aliases):
  * `kmeans` (`euclidean_kmeans`): scikit-learn k-means from a seeded k-means++ start with a tolerance (DataFlex
    ran randomly initialised Lloyd iterations for a fixed count);
  * `spherical` (`spherical_kmeans`, `cosine_kmeans`): Lloyd on the unit sphere (cosine assignment, normalised
    means) from a seeded k-means++ start, until no label changes or `max_iter`;
  * `farthest_first` (`kcenter`, `k_center`): greedy k-center from a seeded first point, then nearest center;
  * `random_projection_lsh` (`lsh`, `rp_lsh`): sign patterns of `bits` seeded Gaussian hyperplanes; buckets beyond
    K are folded modulo K (as DataFlex);
  * `random_partition` (`random`): a seeded permutation dealt round-robin into K equal parts.
Every method is deterministic for a seed and returns contiguous labels 0..K'-1 (K' <= K: no empty cluster).
A cluster's centroid is the mean of its rows' embeddings, whatever the method.

Representative strategies (`representative_strategy`): `nearest` (`centroid`, `center`, `nearest_to_centroid`),
`farthest` (`boundary`, `farthest_from_centroid`), `mixed` (nearest, farthest, 2nd nearest, 2nd farthest, ...;
`center_boundary`, `mixed_center_boundary`) and `random` (`rand`, a seeded permutation); ties go to the lower row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dataflex.core.errors import ConfigError, DataError

CLUSTERING_METHODS = {
    "kmeans": "kmeans",
    "euclidean_kmeans": "kmeans",
    "spherical": "spherical",
    "spherical_kmeans": "spherical",
    "cosine_kmeans": "spherical",
    "farthest_first": "farthest_first",
    "kcenter": "farthest_first",
    "k_center": "farthest_first",
    "random_projection_lsh": "random_projection_lsh",
    "lsh": "random_projection_lsh",
    "rp_lsh": "random_projection_lsh",
    "random_partition": "random_partition",
    "random": "random_partition",
}
REPRESENTATIVE_STRATEGIES = {
    "nearest": "nearest",
    "nearest_to_centroid": "nearest",
    "centroid": "nearest",
    "center": "nearest",
    "farthest": "farthest",
    "farthest_from_centroid": "farthest",
    "boundary": "farthest",
    "mixed": "mixed",
    "mixed_center_boundary": "mixed",
    "center_boundary": "mixed",
    "random": "random",
    "rand": "random",
}
MAX_LSH_BITS = 30  # 2^30 buckets is far past any pool; keeps the bucket ids small integers
DEFAULT_CHUNK = 4096


def canonical_method(name: str) -> str:
    """The canonical clustering method for a DataFlex name or alias (case-insensitive)."""
    method = CLUSTERING_METHODS.get(str(name).lower()) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(
            f"clustering_method must be one of {', '.join(sorted(set(CLUSTERING_METHODS.values())))} "
            f"(or an alias: {', '.join(k for k, v in CLUSTERING_METHODS.items() if k != v)}), got {name!r}"
        )
    return method


def canonical_strategy(name: str) -> str:
    """The canonical representative strategy for a DataFlex name or alias (case-insensitive)."""
    strategy = REPRESENTATIVE_STRATEGIES.get(str(name).lower()) if isinstance(name, str) else None
    if strategy is None:
        raise ConfigError(
            f"representative_strategy must be one of "
            f"{', '.join(sorted(set(REPRESENTATIVE_STRATEGIES.values())))} (or an alias: "
            f"{', '.join(k for k, v in REPRESENTATIVE_STRATEGIES.items() if k != v)}), got {name!r}"
        )
    return strategy


def num_clusters_for(n: int, n_clusters: int | None = None, cluster_size: int | None = None) -> int:
    """K for a pool of n rows: `n_clusters` when given, else ceil(n / `cluster_size`) (DataFlex's rule); in [1, n]."""
    if n < 1:
        raise DataError("clustering needs a non-empty pool")
    if n_clusters is not None:
        k = int(n_clusters)
    elif cluster_size is not None:
        k = math.ceil(n / max(1, int(cluster_size)))
    else:
        raise ConfigError("set n_clusters (the number of clusters) or cluster_size (rows per cluster)")
    return max(1, min(k, n))


def _matrix(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    x = np.ascontiguousarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"clustering needs a non-empty [N, d] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError("clustering embeddings hold NaN or infinite values")
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _assign(x: np.ndarray, centers: np.ndarray, *, cosine: bool, chunk: int) -> np.ndarray:
    """Nearest center of every row (largest cosine, or smallest Euclidean distance), `chunk` rows at a time so the
    [rows, K] block stays small; ties go to the lower center."""
    out = np.empty(len(x), dtype=np.int64)
    c_sq = (centers**2).sum(axis=1)
    for s in range(0, len(x), chunk):
        block = x[s : s + chunk]
        sims = block @ centers.T
        if cosine:
            out[s : s + chunk] = sims.argmax(axis=1)
        else:
            out[s : s + chunk] = ((block**2).sum(axis=1)[:, None] - 2 * sims + c_sq[None, :]).argmin(axis=1)
    return out


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..K'-1 (sorted by old id), so no cluster is empty."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def cluster_means(embeddings: torch.Tensor | np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[K, d] mean embedding of each cluster (labels 0..K-1, none empty)."""
    x = _matrix(embeddings)
    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    if (counts == 0).any():
        raise DataError("cluster_means: a cluster id has no rows (labels must be contiguous)")
    return sums / counts[:, None]


def kmeans(
    embeddings: torch.Tensor | np.ndarray, n_clusters: int, *, seed: int = 0, tol: float = 1e-4, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64, centroids [K, d]) of Lloyd k-means from a seeded k-means++ start; K = min(n_clusters, N)."""
    from sklearn.cluster import KMeans

    x = _matrix(embeddings)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ConfigError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if not tol >= 0:
        raise ConfigError(f"k-means tol must be >= 0, got {tol!r}")
    k = min(n_clusters, len(x))
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, tol=tol, max_iter=max_iter, random_state=seed)
    labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_


def spherical_kmeans(
    embeddings: torch.Tensor | np.ndarray, k: int, *, seed: int = 0, max_iter: int = 300, chunk: int = DEFAULT_CHUNK
) -> np.ndarray:
    """[N] labels of k-means on the unit sphere: cosine assignment, normalised means, k-means++ start."""
    from sklearn.cluster import kmeans_plusplus

    x = _unit(_matrix(embeddings))
    k = min(k, len(x))
    centers = _unit(kmeans_plusplus(x, k, random_state=seed)[0])
    labels = _assign(x, centers, cosine=True, chunk=chunk)
    for _ in range(max_iter):
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        empty = np.bincount(labels, minlength=k) == 0
        if empty.any():  # re-seed an emptied center at the rows worst served by their own (deterministic)
            served = (x * centers[labels]).sum(axis=1)
            sums[empty] = x[np.argsort(served, kind="stable")[: int(empty.sum())]]
        centers = _unit(sums)
        new = _assign(x, centers, cosine=True, chunk=chunk)
        if (new == labels).all():
            break
        labels = new
    return _compact(labels)


def farthest_first(
    embeddings: torch.Tensor | np.ndarray, k: int, *, seed: int = 0, chunk: int = DEFAULT_CHUNK
) -> np.ndarray:
    """[N] labels of greedy k-center: a seeded first center, then repeatedly the row farthest from every chosen
    center (ties to the lower row, never a chosen one twice); rows go to their nearest center."""
    x = _matrix(embeddings)
    n = len(x)
    k = min(k, n)
    first = int(np.random.default_rng(seed).integers(n))
    chosen = [first]
    min_d = np.linalg.norm(x - x[first], axis=1)
    for _ in range(1, k):
        scores = min_d.copy()
        scores[chosen] = -np.inf
        nxt = int(scores.argmax())
        chosen.append(nxt)
        min_d = np.minimum(min_d, np.linalg.norm(x - x[nxt], axis=1))
    return _compact(_assign(x, x[np.asarray(chosen)], cosine=False, chunk=chunk))


def random_projection_lsh(
    embeddings: torch.Tensor | np.ndarray,
    k: int,
    *,
    seed: int = 0,
    bits: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """[N] labels from the sign pattern of `bits` (default ceil(log2 K)) seeded Gaussian hyperplanes; when more
    than K buckets are occupied they are folded modulo K (DataFlex's rule)."""
    x = _matrix(embeddings)
    k = min(k, len(x))
    bits = min(int(bits) if bits else max(1, math.ceil(math.log2(max(k, 2)))), MAX_LSH_BITS)
    planes = np.random.default_rng(seed).standard_normal((x.shape[1], bits))
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    buckets = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        buckets[s : s + chunk] = ((x[s : s + chunk] @ planes) >= 0).astype(np.int64) @ weights
    labels = _compact(buckets)
    return _compact(labels % k) if labels.max() + 1 > k else labels


def random_partition(n: int, k: int, *, seed: int = 0) -> np.ndarray:
    """[n] labels of a seeded permutation dealt round-robin into min(k, n) parts (sizes differ by at most one)."""
    if n < 1:
        raise DataError("clustering needs a non-empty pool")
    k = min(k, n)
    labels = np.empty(n, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return labels


def cluster(
    embeddings: torch.Tensor | np.ndarray,
    method: str,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    chunk: int = DEFAULT_CHUNK,
    lsh_bits: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N] int64 contiguous, centroids [K', d] = cluster means) of `method` (a name or alias)."""
    method = canonical_method(method)
    x = _matrix(embeddings)
    if method == "kmeans":
        labels = _compact(kmeans(x, k, seed=seed, tol=tol, max_iter=max_iter)[0])
    elif method == "spherical":
        labels = spherical_kmeans(x, k, seed=seed, max_iter=max_iter, chunk=chunk)
    elif method == "farthest_first":
        labels = farthest_first(x, k, seed=seed, chunk=chunk)
    elif method == "random_projection_lsh":
        labels = random_projection_lsh(x, k, seed=seed, bits=lsh_bits, chunk=chunk)
    else:
        labels = random_partition(len(x), k, seed=seed)
    return labels, cluster_means(x, labels)


def ranked_by_strategy(
    embeddings: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    strategy: str = "nearest",
    *,
    seed: int | Sequence[int] = 0,
) -> list[list[int]]:
    """Per cluster, its rows in `strategy` order (see the module docstring); `random` draws one seeded permutation
    per cluster, clusters in id order."""
    strategy = canonical_strategy(strategy)
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    rng = np.random.default_rng(seed) if strategy == "random" else None
    out = []
    for c in range(len(centroids)):
        rows = np.where(labels == c)[0]
        if rng is not None:
            out.append(rows[rng.permutation(len(rows))].tolist())
            continue
        d = np.linalg.norm(x[rows] - centroids[c], axis=1)
        near = rows[np.lexsort((rows, d))].tolist()
        if strategy == "nearest":
            out.append(near)
        elif strategy == "farthest":
            out.append(rows[np.lexsort((rows, -d))].tolist())
        else:  # mixed: nearest, farthest, 2nd nearest, 2nd farthest, ... each row once
            far = rows[np.lexsort((rows, -d))].tolist()
            seen: set[int] = set()
            merged = []
            for pair in zip(near, far):
                for r in pair:
                    if r not in seen:
                        seen.add(r)
                        merged.append(r)
            out.append(merged)
    return out


def ranked_members(embeddings: torch.Tensor | np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> list[list[int]]:
    """Per cluster, its rows from nearest to farthest from the centroid (ties to the lower row)."""
    return ranked_by_strategy(embeddings, labels, centroids, "nearest")


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
