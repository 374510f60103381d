"""LESS matching: influence scores of pool samples for a target task, and the top-k selection.

score(z) = agg_s mean_{v in subtask s} Σ_c w_c · cos(Γ_c(z), g_c(v))

with Γ_c the pool's (Adam) features and g_c the target's (SGD) features at checkpoint c, and w_c the
checkpoints' average learning rates normalised to sum to 1 (LESS `matching.py`). `agg` is `max` over subtasks
(LESS) or `mean` over every target example (DataFlex's online LESS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from dataflex.core.errors import ConfigError, DataError
from dataflex.utils.logging import logger

AGGREGATIONS = ("max", "mean")


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def checkpoint_weights(lrs: Sequence[float]) -> list[float]:
    """LESS's checkpoint weights: average learning rates, normalised to sum to 1."""
    total = float(sum(lrs))
    if not lrs or total <= 0 or any(lr < 0 or not math.isfinite(lr) for lr in lrs):
        raise ConfigError(f"checkpoint weights need non-negative learning rates with a positive sum, got {list(lrs)}")
    return [float(lr) / total for lr in lrs]


def influence(train: Sequence[torch.Tensor], target: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """[N, M] Σ_c w_c · cos(train_c[i], target_c[j]); `weights` are used as given (see checkpoint_weights)."""
    if not (len(train) == len(target) == len(weights)) or not train:
        raise ConfigError(
            f"matching needs one train and one target feature set per checkpoint and one weight each; "
            f"got {len(train)}, {len(target)} and {len(weights)}"
        )
    out = None
    for tr, tg, w in zip(train, target, weights):
        if tr.shape[1] != tg.shape[1]:
            raise DataError(
                f"train features have dim {tr.shape[1]} but target features {tg.shape[1]}: they must "
                "come from the same projector"
            )
        part = w * (normalize_rows(tr) @ normalize_rows(tg).T)
        out = part if out is None else out + part
    return out


def aggregate(scores: torch.Tensor, subtasks: Sequence[int] | None = None, how: str = "max") -> torch.Tensor:
    """[N, M] -> [N]: mean within each subtask, then max over subtasks (`max`), or mean over all M (`mean`)."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    if how == "mean" or subtasks is None:
        return scores.mean(dim=1)
    ids = torch.as_tensor(list(subtasks), dtype=torch.long)
    if ids.numel() != scores.shape[1]:
        raise DataError(f"{ids.numel()} subtask ids for {scores.shape[1]} target examples")
    means = [scores[:, ids == s].mean(dim=1) for s in ids.unique(sorted=True).tolist()]
    return torch.stack(means, dim=1).max(dim=1).values


def less_scores(
    train: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    lrs: Sequence[float],
    subtasks: Sequence[int] | None = None,
    aggregation: str = "max",
) -> torch.Tensor:
    """[N] LESS scores of the pool for one target."""
    return aggregate(influence(train, target, checkpoint_weights(lrs)), subtasks, aggregation)


def target_directions(target: torch.Tensor, subtasks: Sequence[int] | None, how: str) -> torch.Tensor:
    """[dim, S]: the mean unit target feature of each subtask (`max`), or of the whole target (`mean`; S = 1).

    mean_v cos(x, g_v) = unit(x) · mean_v unit(g_v): a pool row's score is a dot product with these columns, so
    the pool can be streamed shard by shard (`streamed_less_scores`)."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
    unit = normalize_rows(target)
    if how == "mean" or subtasks is None:
        return unit.mean(dim=0, keepdim=True).T
    ids = torch.as_tensor(list(subtasks), dtype=torch.long)
    if ids.numel() != unit.shape[0]:
        raise DataError(f"{ids.numel()} subtask ids for {unit.shape[0]} target examples")
    return torch.stack([unit[ids == s].mean(dim=0) for s in ids.unique(sorted=True).tolist()], dim=1)


def streamed_less_scores(
    train_stores: Sequence[object],
    targets: Mapping[str, tuple[Sequence[torch.Tensor], Sequence[int] | None]],
    lrs: Sequence[float],
    aggregation: str = "max",
) -> dict[str, torch.Tensor]:
    """`less_scores` for every target at once, reading each checkpoint's pool features one datastore shard at a
    time: peak memory O(shard x dim + N x subtasks), never O(N x dim x checkpoints).

    `train_stores`: one complete datastore (path or reference) per checkpoint; `targets`: name -> (its feature
    matrix per checkpoint, subtask ids). Equal to `less_scores` up to fp32 summation order."""
    from dataflex.features.datastore import iter_shards

    weights = checkpoint_weights(lrs)
    if not (len(train_stores) == len(weights)) or not train_stores:
        raise ConfigError(f"matching needs one pool store and one weight per checkpoint; got {len(train_stores)}")
    names = list(targets)
    columns: list[list[torch.Tensor]] = [[] for _ in train_stores]  # per checkpoint: each target's [dim, S_t]
    for name in names:
        feats, subtasks = targets[name]
        if len(feats) != len(train_stores):
            raise ConfigError(f"target {name}: {len(feats)} feature sets for {len(train_stores)} checkpoints")
        for c, f in enumerate(feats):
            columns[c].append(target_directions(f, subtasks, aggregation))
    widths = [m.shape[1] for m in columns[0]]
    scores: torch.Tensor | None = None
    for c, (store, w) in enumerate(zip(train_stores, weights)):
        directions = torch.cat(columns[c], dim=1)  # [dim, Σ S_t]
        for lo, feats, norms in iter_shards(store):  # type: ignore[arg-type]
            if feats.shape[1] != directions.shape[0]:
                raise DataError(
                    f"train features have dim {feats.shape[1]} but target features {directions.shape[0]}: they "
                    "must come from the same projector"
                )
            if scores is None:
                total = _store_rows(store)
                scores = torch.zeros(total, directions.shape[1], dtype=torch.float32)
            # unit(x) . d = (x . d) / |x|: dividing the [rows, S] product saves a full pass over the shard
            dots = feats.float() @ directions
            scores[lo : lo + feats.shape[0]] += w * dots / norms.float().clamp(min=1e-12).unsqueeze(1)
    assert scores is not None
    out, start = {}, 0
    for name, width in zip(names, widths):
        out[name] = scores[:, start : start + width].max(dim=1).values
        start += width
    return out


def _store_rows(store: object) -> int:
    from dataflex.features.datastore import store_manifest

    return int(store_manifest(store)["num_samples"])  # type: ignore[arg-type]


def top_k(scores: torch.Tensor, *, percentage: float | None = None, max_samples: int | None = None) -> list[int]:
    """Indices of the best scores, highest first; ties go to the lower index, NaN scores rank last.

    The budget is `max_samples` when set, else int(percentage · N) (LESS's rule), at least 1."""
    n = scores.numel()
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ConfigError(f"max_samples must be an integer >= 1 or null, got {max_samples!r}")
        k = min(max_samples, n)
    else:
        if percentage is None or not 0 < percentage <= 1:
            raise ConfigError(f"percentage must be in (0, 1], got {percentage!r}")
        k = max(1, int(percentage * n))
    s = scores.detach().double().cpu()
    nan = torch.isnan(s)
    if nan.any():
        logger.warning("%d of %d scores are NaN; they rank last", int(nan.sum()), n)
    # Sort by (-score, index): a stable sort of -score keeps equal scores in index order.
    key = torch.where(nan, torch.full_like(s, math.inf), -s)
    order = torch.sort(key, stable=True).indices
    return order[:k].tolist()
