"""One-shot (static) selection with any registered selector, then a fresh training on the selection: the
`static_select` Kedro pipeline (`kedro run --pipelines=static_select`).

    targets -> [LESS warm-up, optional] -> compute_features -> select -> final training -> evaluate -> report

It reuses the `less` pipeline's pieces: the target dev sets (`build_targets`), the content-cached warm-up (its last
checkpoint gives the model state and Adam moments of `cluster_less` / `nice`), the selected-rows jsonl and the
final training; the selector runs exactly as inside `dynamic_select` (`compute_features` then `select` with the
features), so NEAR, TSDS, ClusterLESS and NICE compute their offline artefacts (embeddings, neighbours, KDE
probabilities, clusters, rollouts) as this pipeline's feature node. Indices are pool rows; the selection file
stores `sample_id`s, which equal the rows of the processed pool.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.data import domain_names
from dataflex.models import load_tokenizer, model_fingerprint
from dataflex.train import less as less_lib
from dataflex.train.less_config import target_names
from dataflex.train.static_select_config import DEFAULTS, check_config  # noqa: F401  (re-exported)
from dataflex.utils.io import atomic_write_json, atomic_write_text
from dataflex.utils.logging import logger


def config(group: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULTS, **dict(group or {})}


def target_union(targets: Mapping[str, Any]) -> datasets.Dataset:
    """All targets' rows as the selector's eval set; `domain_id` numbers every (target, subtask) pair."""
    parts, offset = [], 0
    for name in targets:
        ds = targets[name].select_columns(["input_ids", "labels", "domain_id"])
        ids = [d + offset for d in ds["domain_id"]]
        parts.append(ds.remove_columns("domain_id").add_column("domain_id", ids))
        offset = max(ids) + 1
    return datasets.concatenate_datasets(parts)


def build_selector(cfg: Mapping[str, Any], train_pool: Any, targets: Mapping[str, Any], seed: int) -> Any:
    import dataflex.train.selector  # noqa: F401

    params = dict(cfg.get("params") or {})
    runtime: dict[str, Any] = {
        "dataset": train_pool,
        "eval_dataset": target_union(targets),
        "accelerator": None,
        "data_collator": None,
    }
    if "cache_dir" not in params:
        runtime["cache_dir"] = str(cfg["cache_dir"])
    if "seed" not in params:
        runtime["seed"] = seed
    return REGISTRY.build("selector", cfg["selector"], runtime=runtime, cfg=params)


def warmup(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    cfg: Mapping[str, Any],
    metrics_sink: Any = None,
) -> dict[str, Any]:
    """LESS's cached warm-up when `warmup_epochs` > 0, else no checkpoint (features at the fresh model)."""
    if cfg["warmup_epochs"] == 0:
        return {"checkpoints": [], "cache": "skipped"}
    return less_lib.warmup(
        train_pool,
        model_params,
        train_params,
        {
            "warmup_percentage": cfg["warmup_percentage"],
            "warmup_epochs": cfg["warmup_epochs"],
            "warmup_dir": cfg["warmup_dir"],
        },
        metrics_sink=metrics_sink,
    )


def _model(selector: Any, model_params: Mapping[str, Any], warmup_result: Mapping[str, Any], seed: int) -> Any:
    if not getattr(selector, "needs_model", True):
        return None  # text encoders: no training model to load
    from dataflex.train.runner import build_model, load_checkpoint_model

    ckpts = warmup_result.get("checkpoints") or []
    return load_checkpoint_model(model_params, ckpts[-1]["path"], seed) if ckpts else build_model(model_params, seed)


def compute_features(
    train_pool: Any,
    targets: Mapping[str, Any],
    warmup_result: Mapping[str, Any],
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    cfg: Mapping[str, Any],
) -> dict[str, Any]:
    """The selector's offline artefacts (content-cached by the selector itself)."""
    seed = int(train_params["seed"])
    start = time.perf_counter()
    selector = build_selector(cfg, train_pool, targets, seed)
    if not hasattr(selector, "compute_features"):
        return {"selector": cfg["selector"], "features": None, "seconds": 0.0}
    ckpts = warmup_result.get("checkpoints") or []
    feats = selector.compute_features(
        _model(selector, model_params, warmup_result, seed),
        0,
        optimizer_state=ckpts[-1]["path"] if ckpts else None,
        base_model_id=model_fingerprint(model_params["model_name_or_path"]),
        tokenizer=load_tokenizer(model_params["model_name_or_path"]),
    )
    return {"selector": cfg["selector"], "features": feats, "seconds": time.perf_counter() - start}


def budget(cfg: Mapping[str, Any], pool_size: int) -> int:
    if cfg.get("max_samples") is not None:
        return min(int(cfg["max_samples"]), pool_size)
    return max(1, int(float(cfg["percentage"]) * pool_size))


def select(
    train_pool: Any,
    targets: Mapping[str, Any],
    warmup_result: Mapping[str, Any],
    features: Mapping[str, Any],
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    cfg: Mapping[str, Any],
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """Run the selector once and write selections/<target>.json, selected/<target>.jsonl; LESS's summary format."""
    seed = int(train_params["seed"])
    start = time.perf_counter()
    selector = build_selector(cfg, train_pool, targets, seed)
    k = budget(cfg, len(train_pool))
    model = None if features.get("features") else _model(selector, model_params, warmup_result, seed)
    tokenizer = load_tokenizer(model_params["model_name_or_path"])
    raw = selector.select(model, 0, k, features=features.get("features"), tokenizer=tokenizer)
    picked = list(dict.fromkeys(int(i) for i in raw))  # one-shot: a subset, so repeats are dropped
    seconds = time.perf_counter() - start
    bad = [i for i in picked if not 0 <= i < len(train_pool)]
    if bad:
        raise ConfigError(f"selector '{cfg['selector']}' returned row {bad[0]} outside the pool [0, {len(train_pool)})")
    names = domain_names(train_pool)
    dom = train_pool["domain_id"]
    sample_ids = train_pool["sample_id"]
    counts = dict.fromkeys(names, 0)
    for i in picked:
        counts[names[dom[i]]] += 1
    name = "+".join(target_names(cfg))
    out = Path(cfg["output_dir"])
    selection = {
        "target": name,
        "selector": cfg["selector"],
        "indices": [int(sample_ids[i]) for i in picked],
        "budget": k,
        "domain_counts": counts,
        "metric": getattr(selector, "last_metric", {}),
        "select_seconds": seconds,
        "features_seconds": features.get("seconds"),
    }
    atomic_write_json(out / "selections" / f"{name}.json", selection)
    atomic_write_text(out / "selected" / f"{name}.jsonl", less_lib.selected_jsonl(train_pool, picked, data))
    logger.info(
        "static_select (%s) selected %d of %d samples for %s: %s",
        cfg["selector"],
        len(picked),
        len(train_pool),
        name,
        ", ".join(f"{n}={c}" for n, c in counts.items() if c),
    )
    pool_counts = {n: list(dom).count(d) for d, n in enumerate(names)}
    return {
        "selector": cfg["selector"],
        "targets": {name: {k2: v for k2, v in selection.items() if k2 != "metric"}},
        "domains": names,
        "pool_size": len(train_pool),
        "pool_domain_counts": pool_counts,
    }


def final_train(
    train_pool: Any,
    selection: Mapping[str, Any],
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    cfg: Mapping[str, Any],
    metrics_sink: Any = None,
) -> dict[str, Any]:
    result = less_lib.final_train(
        train_pool,
        selection,
        model_params,
        train_params,
        {"final_epochs": cfg["final_epochs"]},
        metrics_sink=metrics_sink,
    )
    return {**result, "train_type": "static_select", "selector": selection["selector"]}
