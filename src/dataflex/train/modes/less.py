"""LESS (Xia et al., ICML 2024) as four library steps; the `less` Kedro pipeline wires them as nodes.

1. `warmup`: LoRA training on a random `warmup_percentage` of the pool for `warmup_epochs`, a TrainState
   (weights + Adam moments) at the end of every epoch, and each epoch's average learning rate.
2. `checkpoint_features(kind="train")`: Adam features of the whole pool at one warm-up checkpoint.
3. `checkpoint_features(kind="target")`: SGD features of each target's dev set at the same checkpoint.
4. `select`: score(z) = agg_s mean_{v in s} Σ_c w_c cos(Γ_c(z), g_c(v)), top `percentage` / `max_samples` per
   target; writes the selection JSON, the selected rows in their raw format (jsonl) and the pool's score table.
5. `final_train`: a fresh model from the base on the selected subset (the union over targets).

Steps 1-3 are cached by content (warm-up: pool, model and settings; features: the gradient datastore), so
a new target, percentage or aggregation recomputes only target features and matching.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch

from dataflex.core.errors import ConfigError
from dataflex.data import dataset_fingerprint, domain_names
from dataflex.data.dataset_info import resolve_datasets
from dataflex.data.pools import build_named
from dataflex.data.readers import read_rows
from dataflex.distributed.launch import MetricsSink, distributable
from dataflex.features import FeatureSettings, GradientDatastore, streamed_less_scores, top_k
from dataflex.models import model_fingerprint
from dataflex.train.less_config import LessConfig, target_list, target_names
from dataflex.train.run import Run, load_checkpoint_model, train
from dataflex.train.trainer.loop import scheduled_learning_rates
from dataflex.train.trainer.state import read_manifest
from dataflex.utils.io import atomic_write_json, sha256_json
from dataflex.utils.logging import logger

if TYPE_CHECKING:
    from dataflex.config import DataConfig, RunConfig

WARMUP_VERSION = "2"  # bump when the warm-up or its result format changes: cached warm-ups become misses


# ----------------------------------------------------------------------------- data


def build_targets(data: DataConfig, targets: Any, tokenizer: Any, seed: int) -> datasets.DatasetDict:
    """Tokenised dev set of each target (`targets`: a group's `targets` value); a target's subtasks are its
    datasets."""
    group = {"targets": targets}
    return datasets.DatasetDict(
        {name: build_named(t, data, tokenizer, seed) for name, t in zip(target_names(group), target_list(group))}
    )


# ----------------------------------------------------------------------------- 1. warm-up


def warmup_subset(pool_size: int, percentage: float, seed: int) -> list[int]:
    k = max(1, int(percentage * pool_size))
    return sorted(random.Random(f"less-warmup:{seed}").sample(range(pool_size), k))


@distributable
def warmup(
    cfg: RunConfig,
    pool: Any,
    percentage: float,
    epochs: int,
    warmup_dir: str,
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train on a random `percentage` of the pool for `epochs` epochs with a TrainState at the end of every epoch;
    cached by (pool, model, settings) under `warmup_dir`."""
    seed = cfg.train.seed
    subset = warmup_subset(len(pool), percentage, seed)
    volatile = ("output_dir", "progress_bar", "logging_steps")
    key = sha256_json(
        {
            "pool": dataset_fingerprint(pool),
            "model": model_fingerprint(cfg.model.model_name_or_path),
            "model_params": cfg.model.to_dict(),
            "train": {k: v for k, v in cfg.train.to_dict().items() if k not in volatile},
            "warmup_percentage": percentage,
            "warmup_epochs": epochs,
            "version": WARMUP_VERSION,
        }
    )
    out = Path(warmup_dir) / key[:24]
    cached = _cached_warmup(out, key)
    if cached is not None:
        logger.info("LESS warm-up: cache hit (%d checkpoints) at %s", len(cached["checkpoints"]), out)
        return {**cached, "cache": "hit"}
    args = replace(
        cfg.train,
        output_dir=str(out),
        num_train_epochs=float(epochs),
        max_steps=-1,
        save_steps=0,
        resume_from_checkpoint=None,
    )
    run = Run(replace(cfg, train=args), pool.select(subset), metrics_sink=metrics_sink)
    plan = run.trainer.plan
    lrs = scheduled_learning_rates(args, plan.num_steps)
    checkpoints = []
    for epoch in range(1, epochs + 1):
        end = min(epoch * plan.steps_per_epoch, plan.num_steps)
        run.train(until_step=end)
        path = run.save_state(out / "checkpoints" / f"epoch-{epoch}")
        window = lrs[(epoch - 1) * plan.steps_per_epoch : end]
        checkpoints.append({"epoch": epoch, "step": end, "path": str(path), "avg_lr": sum(window) / len(window)})
        logger.info("LESS warm-up: epoch %d done at step %d (average lr %.3g)", epoch, end, checkpoints[-1]["avg_lr"])
    result = {
        "key": key,
        "dir": str(out),
        "model_name_or_path": cfg.model.model_name_or_path,
        "subset": subset,
        "num_samples": len(subset),
        "pool_size": len(pool),
        "steps_per_epoch": plan.steps_per_epoch,
        "checkpoints": checkpoints,
        "log_history": run.trainer.log_history,
        "domains": domain_names(pool),
    }
    if run.accelerator.is_main_process:
        atomic_write_json(out / "warmup_result.json", result)
    return {**result, "cache": "miss"}


def _cached_warmup(out: Path, key: str) -> dict[str, Any] | None:
    try:
        result = json.loads((out / "warmup_result.json").read_text())
        if result.get("key") != key:
            return None
        for ckpt in result["checkpoints"]:
            read_manifest(ckpt["path"], verify_hashes=False)
        return result
    except Exception:  # any doubt (missing, corrupt, truncated): train again
        return None


# ----------------------------------------------------------------------------- 2-3. features


def feature_settings(less: LessConfig, kind: str) -> FeatureSettings:
    """Pool features use `gradient_type` (adam, as LESS); targets always use SGD gradients, as LESS does."""
    pool = FeatureSettings(
        gradient_type=less.gradient_type,
        projector=less.projector,
        proj_dim=less.proj_dim,
        seed=less.proj_seed,
        adam_eps_placement=less.adam_eps_placement,
        dtype=less.feature_dtype,
    )
    return pool if kind == "train" else pool.for_targets()


@distributable
def checkpoint_features(
    cfg: RunConfig,
    dataset: Any,
    warmup_result: dict[str, Any],
    k: int,
    kind: str,
    name: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Features of `dataset` at warm-up checkpoint `k` through the datastore (reused when present); computed by
    num_processes workers, each on a share of the rows, when that is > 1."""
    less = cfg.less
    ckpt = warmup_result["checkpoints"][k]
    model = load_checkpoint_model(cfg.model, ckpt["path"], cfg.train.seed)
    settings = feature_settings(less, kind)
    store = GradientDatastore(less.datastore_dir, shard_size=less.shard_size)
    ref = store.extract(
        model,
        dataset,
        settings,
        base_model_id=model_fingerprint(cfg.model.model_name_or_path),
        optimizer_state=ckpt["path"] if settings.gradient_type == "adam" else None,
        batch_size=less.feature_batch_size,
        name=f"{name}@epoch-{ckpt['epoch']}",
        progress=progress,
    )
    return {**ref, "checkpoint": k, "epoch": ckpt["epoch"], "kind": kind}


# ----------------------------------------------------------------------------- 4. matching and selection


def select(
    train_pool: Any,
    targets: Mapping[str, Any],
    warmup_result: Mapping[str, Any],
    train_refs: list[Mapping[str, Any]],
    target_refs: list[Mapping[str, Mapping[str, Any]]],
    less: LessConfig,
    data: DataConfig,
) -> dict[str, Any]:
    """Score the pool for every target and pick the top ones; the summary carries the files users read
    (`files`: per-target selection JSON, selected rows as jsonl, the pool's score table) for the catalog to write
    (`data`: the data group)."""
    lrs = [c["avg_lr"] for c in warmup_result["checkpoints"]]
    # Targets are small and loaded whole; the pool is streamed shard by shard, per checkpoint (bounded memory).
    target_inputs = {
        t: ([GradientDatastore.load(refs[t]).features for refs in target_refs], list(targets[t]["domain_id"]))
        for t in targets
    }
    all_scores = streamed_less_scores(train_refs, target_inputs, lrs, less.aggregation)
    files: dict[str, Any] = {}
    sample_ids = list(train_pool["sample_id"])
    pool_domains = list(train_pool["domain_id"])
    names = domain_names(train_pool)
    pool_counts = {n: pool_domains.count(d) for d, n in enumerate(names)}
    summary: dict[str, Any] = {
        "targets": {},
        "checkpoint_lrs": lrs,
        "pool_size": len(train_pool),
        "domains": names,
        "pool_domain_counts": pool_counts,
    }
    table: dict[str, torch.Tensor] = {}
    for target in targets:
        scores = all_scores[target]
        picked = top_k(scores, percentage=less.percentage, max_samples=less.max_samples)
        table[target] = scores
        counts = [0] * len(names)
        for i in picked:
            counts[pool_domains[i]] += 1
        selection = {
            "target": target,
            "indices": [sample_ids[i] for i in picked],
            "scores": [float(scores[i]) for i in picked],
            "aggregation": less.aggregation,
            "percentage": less.percentage,
            "max_samples": less.max_samples,
            "checkpoint_lrs": lrs,
            "domain_counts": dict(zip(names, counts)),
        }
        files[f"selections/{target}.json"] = selection
        files[f"selected/{target}.jsonl"] = selected_jsonl(train_pool, picked, data)
        summary["targets"][target] = {k: v for k, v in selection.items() if k not in ("scores",)}
        summary["targets"][target]["score_stats"] = _stats(scores)
        logger.info(
            "LESS selected %d of %d samples for %s: %s",
            len(picked),
            len(train_pool),
            target,
            ", ".join(f"{n}={c}" for n, c in zip(names, counts) if c),
        )
    files["scores.csv"] = score_table(train_pool, table)
    return {**summary, "files": files}


def _stats(scores: torch.Tensor) -> dict[str, float]:
    s = scores.double()
    return {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()), "std": float(s.std())}


def score_table(train_pool: Any, table: Mapping[str, torch.Tensor]) -> str:
    """CSV: one row per pool sample (sample_id, domain, source_row, one score column per target)."""
    names = domain_names(train_pool)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sample_id", "domain", "source_row", *table])
    rows = zip(train_pool["sample_id"], train_pool["domain_id"], train_pool["source_row"])
    for i, (sid, dom, src) in enumerate(rows):
        writer.writerow([sid, names[dom], src, *(f"{float(s[i]):.8g}" for s in table.values())])
    return buf.getvalue()


def selected_jsonl(train_pool: Any, picked: list[int], data: DataConfig) -> str:
    """The selected samples as their raw rows (the dataset's own columns), one JSON object per line, in score
    order, so the subset can be trained on with any LLaMA-Factory-style tool."""
    names = domain_names(train_pool)
    attrs = {a.name: a for a in resolve_datasets(names, data.dataset_dir)}
    raw = {name: read_rows(attrs[name], data.dataset_dir) for name in names}
    lines = []
    for i in picked:
        row = train_pool[int(i)]
        if row["source_row"] < 0:
            raise ConfigError("packed pt blocks span several raw rows and cannot be written back; set packing: false")
        lines.append(json.dumps(raw[names[row["domain_id"]]][row["source_row"]], ensure_ascii=False))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 5. final training


def selected_indices(selection: Mapping[str, Any]) -> list[int]:
    """The union of every target's selection, in pool order."""
    return sorted({i for t in selection["targets"].values() for i in t["indices"]})


def final_train(
    cfg: RunConfig,
    pool: Any,
    selection: Mapping[str, Any],
    final_epochs: int,
    train_type: str = "less",
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """A fresh model from the base, trained `final_epochs` epochs on the selected subset (LESS's step 5)."""
    indices = selected_indices(selection)
    args = replace(cfg.train, num_train_epochs=float(final_epochs), max_steps=-1)
    extra = {"train_type": train_type, "selected_samples": len(indices), "targets": list(selection["targets"])}
    return train(replace(cfg, train=args), pool.select(indices), summary_extra=extra, metrics_sink=metrics_sink)
