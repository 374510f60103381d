"""Selection rules over neighbour matrices: NEAR's column-major walk, TSDS's KDE-corrected
transport-vs-diversity probabilities and a seeded draw from a probability vector.

All indices are rows of the embedded pool (its `sample_id` space); nothing here reads files or models.
`tsds_from_neighbors` is the one TSDS computation from embeddings + neighbours, shared by the `tsds` selector and
`dataflex-cli offline-select tsds`, so both give the same probabilities.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from dataflex.core.errors import ConfigError, DataError
from dataflex.features.neighbors import EXACT_THRESHOLD, kde_density
from dataflex.utils.logging import logger


def near_order(neighbors: np.ndarray, k: int | None = None) -> list[int]:
    """Unique pool rows walking the [M, K] matrix column by column (1st neighbour of every query, then the 2nd ...),
    first occurrence wins; the first `k` of them (all when k is None)."""
    idx = np.asarray(neighbors)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"NEAR needs a 2-D integer neighbour matrix, got shape {idx.shape} dtype {idx.dtype}")
    if (idx < 0).any():
        raise DataError("NEAR neighbour matrix holds negative indices (a missing neighbour)")
    flat = idx.T.reshape(-1)  # column-major walk
    _, first = np.unique(flat, return_index=True)
    order = flat[np.sort(first)].tolist()
    return order if k is None else order[:k]


def tsds_probabilities(
    dist: np.ndarray, idx: np.ndarray, density: np.ndarray, n: int, *, alpha: float = 0.6, C: float = 5.0
) -> tuple[np.ndarray, dict[str, float]]:
    """[n] TSDS sampling probabilities and a summary of the greedy stop.

    `dist` / `idx`: [M, K] ascending distances and pool rows of every query's neighbours; `density[i]` = ρ of pool
    row i (only rows appearing in `idx` are read). Each query spreads mass 1/M over its nearest candidates with
    weights 1/ρ, out to a radius where (α/C)·transport cost reaches (1−α)·M.
    """
    dist, idx, rho = np.asarray(dist, dtype=np.float64), np.asarray(idx), np.asarray(density, dtype=np.float64)
    if dist.shape != idx.shape or dist.ndim != 2 or dist.shape[1] < 1:
        raise DataError(f"tsds: distances {dist.shape} and indices {idx.shape} must be the same [M, K] shape")
    if not 0 < alpha < 1:
        raise ConfigError(f"tsds alpha must be in (0, 1), got {alpha!r}")
    if not C > 0:
        raise ConfigError(f"tsds C must be > 0, got {C!r}")
    if (idx < 0).any() or (idx >= n).any():
        raise DataError(f"tsds neighbour indices must be pool rows in [0, {n})")
    if (rho[idx] <= 0).any():
        raise DataError("tsds densities must be > 0 for every retrieved candidate")
    m, kk = dist.shape
    inv = 1.0 / rho[idx]  # [M, K]
    ptr = np.zeros(m, dtype=np.int64)
    a = inv[:, 0].copy()
    b = dist[:, 0] * inv[:, 0]
    cost = np.zeros(m)
    last = np.zeros(m, dtype=np.int64)
    heap = [(float(a[j]), j) for j in range(m)]
    heapq.heapify(heap)
    s = float(a.min())
    total = 0.0
    while heap:
        _, j = heapq.heappop(heap)
        s = float(a[j])
        nxt = min(ptr[j] + 1, kk - 1)
        cost[j] = dist[j, nxt] * a[j] - b[j]
        total = float(cost.sum())
        if (alpha / C) * total >= (1 - alpha) * m:
            break
        last[j] = ptr[j]
        if ptr[j] < kk - 2:
            ptr[j] += 1
            a[j] += inv[j, ptr[j]]
            b[j] += dist[j, ptr[j]] * inv[j, ptr[j]]
            heapq.heappush(heap, (float(a[j]), j))
    probs = np.zeros(n)
    for j in range(m):
        given = 0.0
        for k in range(last[j] + 1):
            mass = (1.0 / m) / (s * rho[idx[j, k]])
            probs[idx[j, k]] += mass
            given += mass
        if last[j] + 1 < kk:
            probs[idx[j, last[j] + 1]] += max(1.0 / m - given, 0.0)
    probs = np.clip(probs, 0.0, None)
    if probs.sum() <= 0:
        raise DataError("tsds produced an all-zero distribution")
    probs /= probs.sum()
    return probs, {
        "level": s,
        "transport_cost": total,
        "mean_radius": float(last.mean() + 1),
        "support": int((probs > 0).sum()),
    }


def tsds_from_neighbors(
    pool: torch.Tensor | np.ndarray,
    dist: np.ndarray,
    idx: np.ndarray,
    *,
    alpha: float = 0.6,
    C: float = 5.0,
    sigma: float = 0.75,
    kde_K: int = 1000,
    exact_threshold: int = EXACT_THRESHOLD,
) -> tuple[np.ndarray, dict[str, float]]:
    """[N] TSDS probabilities of the pool rows from the pool embeddings [N, d] and each query's ascending
    neighbours (`dist`, `idx` [M, K]): ρ (KDE, bandwidth σ, `kde_K` neighbours) is estimated on the retrieved rows
    only, among themselves (as the original), then `tsds_probabilities`."""
    pts = pool.detach().cpu().numpy() if isinstance(pool, torch.Tensor) else np.asarray(pool)
    n = len(pts)
    union = np.unique(np.asarray(idx))
    if len(union) and (union[0] < 0 or union[-1] >= n):
        raise DataError(f"tsds neighbour indices must be pool rows in [0, {n})")
    density = np.ones(n)
    density[union] = kde_density(pts[union], sigma, kde_K, exact_threshold=exact_threshold)
    return tsds_probabilities(dist, idx, density, n, alpha=alpha, C=C)


def seeded_draw(probs: np.ndarray | torch.Tensor, k: int, seed: int) -> list[int]:
    """k distinct rows drawn ∝ probs with a private generator (same seed ⇒ same draw on every rank).

    When fewer than k rows have mass (TSDS concentrates it near the queries; DataFlex's `replace=False` crashed),
    every row with mass is taken and the rest is drawn from them again with replacement."""
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    if p.ndim != 1 or (p < 0).any() or not torch.isfinite(p).all() or p.sum() <= 0:
        raise DataError("sampling needs a 1-D vector of finite non-negative probabilities with a positive sum")
    gen = torch.Generator().manual_seed(int(seed))
    support = int((p > 0).sum())
    if k <= support:
        return torch.multinomial(p, k, replacement=False, generator=gen).tolist()
    logger.warning(
        "only %d rows have probability mass for %d samples: taking all of them and repeating draws", support, k
    )
    first = torch.multinomial(p, support, replacement=False, generator=gen).tolist()
    return first + torch.multinomial(p, k - support, replacement=True, generator=gen).tolist()
