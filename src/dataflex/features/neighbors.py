"""Nearest neighbours (faiss) and the KDE density of TSDS, in the row space of the embedded dataset.

Exact search (`IndexFlatL2`) below `exact_threshold` candidates; above it an IVF index (`nlist = sqrt(N)/2`, as the
original) whose missing neighbours (faiss returns -1 when the probed lists hold fewer than K vectors)
are recomputed exactly for the affected queries, so a result never holds -1. K is capped at N.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dataflex.core.errors import ConfigError, DataError
from dataflex.utils.logging import logger

EXACT_THRESHOLD = 50_000


def _f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=np.float32)


def knn(
    candidates: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int,
    *,
    exact_threshold: int = EXACT_THRESHOLD,
    nprobe: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances [M, K] Euclidean, ascending; indices [M, K] int64 rows of `candidates`), K = min(k, N)."""
    import faiss

    cand, q = _f32(candidates), _f32(queries)
    if cand.ndim != 2 or q.ndim != 2 or cand.shape[1] != q.shape[1]:
        raise DataError(f"nearest neighbours need 2-D embeddings of one width; got {cand.shape} and {q.shape}")
    if len(cand) == 0 or len(q) == 0:
        raise DataError("nearest neighbours need at least one candidate and one query")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"number of neighbours must be an integer >= 1, got {k!r}")
    n, d = cand.shape
    k = min(k, n)
    if n <= exact_threshold:
        index = faiss.IndexFlatL2(d)
        index.add(cand)
        dist, idx = index.search(q, k)
    else:
        nlist = max(1, int(math.sqrt(n)) // 2)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        index.cp.seed = seed
        index.train(cand)
        index.add(cand)
        index.nprobe = min(nprobe, nlist)
        dist, idx = index.search(q, k)
        bad = np.where((idx < 0).any(axis=1))[0]
        if len(bad):  # the probed lists were too small: redo those queries exactly
            logger.info(
                "IVF search left %d of %d queries short of %d neighbours; searching them exactly", len(bad), len(q), k
            )
            flat = faiss.IndexFlatL2(d)
            flat.add(cand)
            dist[bad], idx[bad] = flat.search(q[bad], k)
    assert (idx >= 0).all(), "faiss returned a missing neighbour"
    return np.sqrt(np.maximum(dist, 0.0)).astype(np.float64), idx.astype(np.int64)


def kde_density(points: torch.Tensor | np.ndarray, sigma: float, k: int = 1000, **knn_kwargs: object) -> np.ndarray:
    """ρ(c) = Σ over c's K nearest points c' (itself included) of max(0, 1 − ‖c − c'‖² / σ²); σ = 0 gives ρ ≡ 1."""
    pts = _f32(points)
    if sigma < 0:
        raise ConfigError(f"tsds sigma must be >= 0, got {sigma!r}")
    if sigma == 0:
        return np.ones(len(pts))
    dist, _ = knn(pts, pts, k, **knn_kwargs)  # type: ignore[arg-type]
    return np.maximum(0.0, 1.0 - dist**2 / sigma**2).sum(axis=1)
