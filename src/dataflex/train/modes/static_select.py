"""One-shot (static) selection with any registered selector, then a fresh training on the selection: the
`static_select` Kedro pipeline (`kedro run --pipelines=static_select`).

    targets -> [LESS warm-up, optional] -> compute_features -> select -> final training -> evaluate -> report

It reuses the `less` pipeline's pieces: the target dev sets (`build_targets`), the content-cached warm-up (its last
checkpoint gives the model state and Adam moments of `cluster_less` / `nice`), the selected-rows jsonl and the
final training; the selector runs exactly as inside `dynamic_select` (`compute_features` then `select` with the
features), so NEAR, TSDS, ClusterLESS and NICE compute their offline artefacts (embeddings, neighbours, KDE
probabilities, clusters, rollouts) as this pipeline's feature node. Indices are pool rows; the selection file
stores `sample_id`s, which equal the rows of the processed pool.

Seeds as in `dynamic_select`: the selector's `seed` is its own parameter (its default unless `static_select.params`
sets it; it drives the selector's draws, LESS's projector, clustering and rollouts) and the run seed reaches it as
`run_seed` (what a warm-up draw would use), so one selector config gives the same selection in both modes. A
target's subtasks are its datasets, split further by the raw rows' `subtask_column` when the selector sets it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import datasets

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.data import domain_names
from dataflex.distributed.launch import MetricsSink
from dataflex.models import load_tokenizer, model_fingerprint
from dataflex.train.less_config import target_names
from dataflex.train.modes import less as less_lib
from dataflex.train.modes.select import subtask_values
from dataflex.train.run import build_model, load_checkpoint_model
from dataflex.utils.logging import logger

if TYPE_CHECKING:
    from dataflex.config import RunConfig
    from dataflex.train.static_select_config import StaticSelectConfig


def target_union(
    targets: Mapping[str, Any], subtask_column: str | None = None, dataset_dir: str | None = None
) -> datasets.Dataset:
    """All targets' rows as the selector's eval set; `domain_id` numbers every (target, dataset) pair, and the raw
    rows' `subtask_column` (strings), when given, splits those further into subtasks."""
    parts, offset = [], 0
    for name in targets:
        ds = targets[name].select_columns(["input_ids", "labels", "domain_id"])
        ids = [d + offset for d in ds["domain_id"]]
        ds = ds.remove_columns("domain_id").add_column("domain_id", ids)
        if subtask_column is not None:
            ds = ds.add_column(subtask_column, subtask_values(targets[name], subtask_column, dataset_dir))
        parts.append(ds)
        offset = max(ids) + 1
    return datasets.concatenate_datasets(parts)


def build_selector(
    ss: StaticSelectConfig, pool: Any, targets: Mapping[str, Any], seed: int, dataset_dir: str | None = None
) -> Any:
    """The selector with `static_select.params`; `seed` (the run seed) becomes its `run_seed`, never its `seed`."""
    import dataflex.train.selector  # noqa: F401  (registers the built-in selectors)

    params = dict(ss.params or {})
    runtime: dict[str, Any] = {
        "dataset": pool,
        "eval_dataset": target_union(targets, params.get("subtask_column"), dataset_dir),
        "accelerator": None,
        "data_collator": None,
    }
    if "cache_dir" not in params:
        runtime["cache_dir"] = str(ss.cache_dir)
    selector = REGISTRY.build("selector", ss.selector, runtime=runtime, cfg=params)
    selector.run_seed = int(seed)
    return selector


def warmup(cfg: RunConfig, pool: Any, metrics_sink: MetricsSink | None = None) -> dict[str, Any]:
    """LESS's cached warm-up when `warmup_epochs` > 0, else no checkpoint (features at the fresh model)."""
    ss = cfg.static_select
    if ss.warmup_epochs == 0:
        return {"checkpoints": [], "cache": "skipped"}
    return less_lib.warmup(
        cfg,
        pool,
        percentage=ss.warmup_percentage,
        epochs=ss.warmup_epochs,
        warmup_dir=ss.warmup_dir,
        metrics_sink=metrics_sink,
    )


def _model(selector: Any, cfg: RunConfig, warmup_result: Mapping[str, Any]) -> Any:
    if not getattr(selector, "needs_model", True):
        return None  # text encoders: no training model to load
    ckpts = warmup_result.get("checkpoints") or []
    seed = cfg.train.seed
    return load_checkpoint_model(cfg.model, ckpts[-1]["path"], seed) if ckpts else build_model(cfg.model, seed)


def compute_features(
    cfg: RunConfig, pool: Any, targets: Mapping[str, Any], warmup_result: Mapping[str, Any]
) -> dict[str, Any]:
    """The selector's offline artefacts (content-cached by the selector itself)."""
    ss = cfg.static_select
    start = time.perf_counter()
    selector = build_selector(ss, pool, targets, cfg.train.seed, cfg.data.dataset_dir)
    if not hasattr(selector, "compute_features"):
        return {"selector": ss.selector, "features": None, "seconds": 0.0}
    ckpts = warmup_result.get("checkpoints") or []
    feats = selector.compute_features(
        _model(selector, cfg, warmup_result),
        0,
        optimizer_state=ckpts[-1]["path"] if ckpts else None,
        base_model_id=model_fingerprint(cfg.model.model_name_or_path),
        tokenizer=load_tokenizer(cfg.model.model_name_or_path),
    )
    return {"selector": ss.selector, "features": feats, "seconds": time.perf_counter() - start}


def budget(ss: StaticSelectConfig, pool_size: int) -> int:
    if ss.max_samples is not None:
        return min(int(ss.max_samples), pool_size)
    return max(1, int(float(ss.percentage) * pool_size))


def select(
    cfg: RunConfig,
    pool: Any,
    targets: Mapping[str, Any],
    warmup_result: Mapping[str, Any],
    features: Mapping[str, Any],
) -> dict[str, Any]:
    """Run the selector once; LESS's summary format, with selections/<target>.json and selected/<target>.jsonl in
    `files` for the catalog to write."""
    ss = cfg.static_select
    start = time.perf_counter()
    selector = build_selector(ss, pool, targets, cfg.train.seed, cfg.data.dataset_dir)
    k = budget(ss, len(pool))
    model = None if features.get("features") else _model(selector, cfg, warmup_result)
    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    raw = selector.select(model, 0, k, features=features.get("features"), tokenizer=tokenizer)
    picked = list(dict.fromkeys(int(i) for i in raw))  # one-shot: a subset, so repeats are dropped
    seconds = time.perf_counter() - start
    bad = [i for i in picked if not 0 <= i < len(pool)]
    if bad:
        raise ConfigError(f"selector '{ss.selector}' returned row {bad[0]} outside the pool [0, {len(pool)})")
    names = domain_names(pool)
    dom = pool["domain_id"]
    sample_ids = pool["sample_id"]
    counts = dict.fromkeys(names, 0)
    for i in picked:
        counts[names[dom[i]]] += 1
    name = "+".join(target_names({"targets": ss.targets}))
    selection = {
        "target": name,
        "selector": ss.selector,
        "indices": [int(sample_ids[i]) for i in picked],
        "budget": k,
        "domain_counts": counts,
        "metric": getattr(selector, "last_metric", {}),
        "select_seconds": seconds,
        "features_seconds": features.get("seconds"),
    }
    files = {
        f"selections/{name}.json": selection,
        f"selected/{name}.jsonl": less_lib.selected_jsonl(pool, picked, cfg.data),
    }
    composition = ", ".join(f"{n}={c}" for n, c in counts.items() if c)
    logger.info(
        "static_select (%s) selected %d of %d for %s: %s", ss.selector, len(picked), len(pool), name, composition
    )
    pool_counts = {n: list(dom).count(d) for d, n in enumerate(names)}
    return {
        "selector": ss.selector,
        "targets": {name: {k2: v for k2, v in selection.items() if k2 != "metric"}},
        "domains": names,
        "pool_size": len(pool),
        "pool_domain_counts": pool_counts,
        "files": files,  # written by the catalog (dataflex.io.SelectionDataset)
    }


def final_train(
    cfg: RunConfig, pool: Any, selection: Mapping[str, Any], metrics_sink: MetricsSink | None = None
) -> dict[str, Any]:
    """A fresh model from the base, trained `final_epochs` epochs on the selection."""
    result = less_lib.final_train(
        cfg, pool, selection, cfg.static_select.final_epochs, train_type="static_select", metrics_sink=metrics_sink
    )
    return {**result, "selector": selection["selector"]}
