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
from dataflex.train.less_config import target_list, target_names
from dataflex.utils.io import atomic_write_json, atomic_write_text
from dataflex.utils.logging import logger

DEFAULTS: dict[str, Any] = {
    "selector": "near",  # any registered selector: near | tsds | cluster_less | nice | less | loss | random ...
    "params": {},  # its parameters, as under selectors.<name>.params in components.yaml
    "targets": [],  # target dev sets, as less.targets
    "percentage": 0.05,
    "max_samples": None,
    "warmup_epochs": 0,  # > 0: LESS's warm-up first; features at its last checkpoint (needed for adam features)
    "warmup_percentage": 0.05,
    "warmup_dir": "data/06_models/static_select/warmup",
    "cache_dir": "data/04_feature/static_select",
    "output_dir": "data/05_model_input/static_select",
    "final_epochs": 4,
}


def check_config(cfg: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> None:
    """Every setting, before any work: one ConfigError line for the first problem."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join('static_select.' + k for k in unknown)}; "
                          f"valid: {', '.join(sorted(DEFAULTS))}")  # fmt: skip
    import dataflex.train.selector  # noqa: F401  (registers the selectors)

    REGISTRY.check("selector", cfg.get("selector"), cfg.get("params") or {})
    if not target_list(cfg) or not all(target_list(cfg)):
        raise ConfigError("static_select.targets is empty: name the target task's dev set(s), e.g. [arith_dev]")
    if cfg.get("max_samples") is not None:
        m = cfg["max_samples"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"static_select.max_samples must be an integer >= 1 or null, got {m!r}")
    else:
        p = cfg.get("percentage")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ConfigError(f"static_select.percentage must be a fraction in (0, 1], got {p!r}")
    for key, low in (("warmup_epochs", 0), ("final_epochs", 1)):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"static_select.{key} must be an integer >= {low}, got {v!r}")
    if data is not None and (Path(data["dataset_dir"]) / "dataset_info.json").is_file():
        from dataflex.data.dataset_info import resolve_datasets

        for target in target_list(cfg):
            resolve_datasets(target, data["dataset_dir"])


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
    runtime: dict[str, Any] = {"dataset": train_pool, "eval_dataset": target_union(targets), "accelerator": None,
                               "data_collator": None}  # fmt: skip
    if "cache_dir" not in params:
        runtime["cache_dir"] = str(cfg["cache_dir"])
    if "seed" not in params:
        runtime["seed"] = seed
    return REGISTRY.build("selector", cfg["selector"], runtime=runtime, cfg=params)


def warmup(train_pool: Any, model_params: Mapping[str, Any], train_params: Mapping[str, Any],
           cfg: Mapping[str, Any], metrics_sink: Any = None) -> dict[str, Any]:  # fmt: skip
    """LESS's cached warm-up when `warmup_epochs` > 0, else no checkpoint (features at the fresh model)."""
    if cfg["warmup_epochs"] == 0:
        return {"checkpoints": [], "cache": "skipped"}
    return less_lib.warmup(train_pool, model_params, train_params, {
        "warmup_percentage": cfg["warmup_percentage"], "warmup_epochs": cfg["warmup_epochs"],
        "warmup_dir": cfg["warmup_dir"]}, metrics_sink=metrics_sink)  # fmt: skip


def _model(selector: Any, model_params: Mapping[str, Any], warmup_result: Mapping[str, Any], seed: int) -> Any:
    if not getattr(selector, "needs_model", True):
        return None  # text encoders: no training model to load
    from dataflex.train.runner import build_model, load_checkpoint_model

    ckpts = warmup_result.get("checkpoints") or []
    return load_checkpoint_model(model_params, ckpts[-1]["path"], seed) if ckpts else build_model(model_params, seed)


def compute_features(train_pool: Any, targets: Mapping[str, Any], warmup_result: Mapping[str, Any],
                     model_params: Mapping[str, Any], train_params: Mapping[str, Any],
                     cfg: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The selector's offline artefacts (content-cached by the selector itself)."""
    seed = int(train_params["seed"])
    start = time.perf_counter()
    selector = build_selector(cfg, train_pool, targets, seed)
    if not hasattr(selector, "compute_features"):
        return {"selector": cfg["selector"], "features": None, "seconds": 0.0}
    ckpts = warmup_result.get("checkpoints") or []
    feats = selector.compute_features(
        _model(selector, model_params, warmup_result, seed), 0, optimizer_state=ckpts[-1]["path"] if ckpts else None,
        base_model_id=model_fingerprint(model_params["model_name_or_path"]),
        tokenizer=load_tokenizer(model_params["model_name_or_path"]),
    )  # fmt: skip
    return {"selector": cfg["selector"], "features": feats, "seconds": time.perf_counter() - start}


def budget(cfg: Mapping[str, Any], pool_size: int) -> int:
    if cfg.get("max_samples") is not None:
        return min(int(cfg["max_samples"]), pool_size)
    return max(1, int(float(cfg["percentage"]) * pool_size))


def select(train_pool: Any, targets: Mapping[str, Any], warmup_result: Mapping[str, Any], features: Mapping[str, Any],
           model_params: Mapping[str, Any], train_params: Mapping[str, Any], cfg: Mapping[str, Any],
           data: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
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
    selection = {"target": name, "selector": cfg["selector"], "indices": [int(sample_ids[i]) for i in picked],
                 "budget": k, "domain_counts": counts, "metric": getattr(selector, "last_metric", {}),
                 "select_seconds": seconds, "features_seconds": features.get("seconds")}  # fmt: skip
    atomic_write_json(out / "selections" / f"{name}.json", selection)
    atomic_write_text(out / "selected" / f"{name}.jsonl", less_lib.selected_jsonl(train_pool, picked, data))
    logger.info("static_select (%s) selected %d of %d samples for %s: %s", cfg["selector"], len(picked),
                len(train_pool), name, ", ".join(f"{n}={c}" for n, c in counts.items() if c))  # fmt: skip
    pool_counts = {n: list(dom).count(d) for d, n in enumerate(names)}
    return {"selector": cfg["selector"], "targets": {name: {k2: v for k2, v in selection.items() if k2 != "metric"}},
            "domains": names, "pool_size": len(train_pool), "pool_domain_counts": pool_counts}  # fmt: skip


def final_train(train_pool: Any, selection: Mapping[str, Any], model_params: Mapping[str, Any],
                train_params: Mapping[str, Any], cfg: Mapping[str, Any],
                metrics_sink: Any = None) -> dict[str, Any]:  # fmt: skip
    result = less_lib.final_train(train_pool, selection, model_params, train_params,
                                  {"final_epochs": cfg["final_epochs"]}, metrics_sink=metrics_sink)  # fmt: skip
    return {**result, "train_type": "static_select", "selector": selection["selector"]}
