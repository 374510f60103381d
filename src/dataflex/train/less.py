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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import torch

from dataflex.core.errors import ConfigError
from dataflex.data import DataCollatorForCausalLM, dataset_fingerprint, domain_names
from dataflex.data.dataset_info import resolve_datasets
from dataflex.data.pools import build_named
from dataflex.data.readers import read_rows
from dataflex.distributed.launch import distributed, launch
from dataflex.features import FeatureSettings, GradientDatastore, less_scores, top_k
from dataflex.models import load_tokenizer, model_fingerprint
from dataflex.train.less_config import target_list, target_names
from dataflex.train.runner import build_model, load_checkpoint_model, train_model
from dataflex.train.trainer import Trainer, TrainingArguments, make_accelerator
from dataflex.train.trainer.loop import scheduled_learning_rates
from dataflex.train.trainer.state import read_manifest
from dataflex.utils.io import atomic_write_json, atomic_write_text, sha256_json
from dataflex.utils.logging import logger

WARMUP_VERSION = "2"  # bump when the warm-up or its result format changes: cached warm-ups become misses


# ----------------------------------------------------------------------------- data


def build_targets(data: Mapping[str, Any], less: Mapping[str, Any], tokenizer: Any, seed: int) -> datasets.DatasetDict:
    """Tokenised dev set of each target; a target's subtasks are its datasets (domain ids)."""
    return datasets.DatasetDict(
        {name: build_named(t, data, tokenizer, seed) for name, t in zip(target_names(less), target_list(less))}
    )


# ----------------------------------------------------------------------------- 1. warm-up


def _warmup_args(train: Mapping[str, Any], less: Mapping[str, Any], out: Path) -> TrainingArguments:
    return TrainingArguments.from_dict(
        {
            **dict(train),
            "output_dir": str(out),
            "num_train_epochs": float(less["warmup_epochs"]),
            "max_steps": -1,
            "save_steps": 0,
            "resume_from_checkpoint": None,
        }
    )


def warmup_subset(pool_size: int, percentage: float, seed: int) -> list[int]:
    k = max(1, int(percentage * pool_size))
    return sorted(random.Random(f"less-warmup:{seed}").sample(range(pool_size), k))


def warmup(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    less: Mapping[str, Any],
    metrics_sink: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Train on the warm-up subset with a checkpoint per epoch; cached by (pool, model, settings)."""
    seed = int(train_params["seed"])
    subset = warmup_subset(len(train_pool), less["warmup_percentage"], seed)
    key = sha256_json(
        {
            "pool": dataset_fingerprint(train_pool),
            "model": model_fingerprint(model_params["model_name_or_path"]),
            "model_params": dict(model_params),
            "train": {
                k: v for k, v in dict(train_params).items() if k not in ("output_dir", "progress_bar", "logging_steps")
            },
            "warmup_percentage": less["warmup_percentage"],
            "warmup_epochs": less["warmup_epochs"],
            "version": WARMUP_VERSION,
        }
    )
    out = Path(less["warmup_dir"]) / key[:24]
    cached = _cached_warmup(out, key)
    if cached is not None:
        logger.info("LESS warm-up: cache hit (%d checkpoints) at %s", len(cached["checkpoints"]), out)
        return {**cached, "cache": "hit"}
    if distributed(train_params):  # a miss: train the warm-up on num_processes accelerate workers
        return launch(
            "dataflex.train.less:warmup",
            train_params,
            datasets={"train_pool": train_pool},
            kwargs={"model_params": dict(model_params), "train_params": dict(train_params), "less": dict(less)},
            metrics_sink=metrics_sink,
        )
    args = _warmup_args(train_params, less, out)
    tokenizer = load_tokenizer(model_params["model_name_or_path"])
    model = build_model(model_params, seed=seed)
    subset_ds = train_pool.select(subset)
    trainer = Trainer(
        model,
        subset_ds,
        args,
        data_collator=DataCollatorForCausalLM(tokenizer),
        accelerator=make_accelerator(args),
        metrics_sink=metrics_sink,
        domain_names=domain_names(train_pool),
        model_fingerprint=model_fingerprint(model_params["model_name_or_path"]),
    )
    lrs = scheduled_learning_rates(args, trainer.plan.num_steps)
    per_epoch = trainer.plan.steps_per_epoch
    checkpoints = []
    for epoch in range(1, int(less["warmup_epochs"]) + 1):
        end = min(epoch * per_epoch, trainer.plan.num_steps)
        trainer.train(until_step=end)
        path = trainer.save_checkpoint(out / "checkpoints" / f"epoch-{epoch}")
        window = lrs[(epoch - 1) * per_epoch : end]
        checkpoints.append({"epoch": epoch, "step": end, "path": str(path), "avg_lr": sum(window) / len(window)})
        logger.info("LESS warm-up: epoch %d done at step %d (average lr %.3g)", epoch, end, checkpoints[-1]["avg_lr"])
    result = {
        "key": key,
        "dir": str(out),
        "model_name_or_path": model_params["model_name_or_path"],
        "subset": subset,
        "num_samples": len(subset),
        "pool_size": len(train_pool),
        "steps_per_epoch": per_epoch,
        "checkpoints": checkpoints,
        "log_history": trainer.log_history,
        "domains": domain_names(train_pool),
    }
    if trainer.accelerator.is_main_process:
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


def feature_settings(less: Mapping[str, Any], kind: str) -> FeatureSettings:
    """Pool features use `gradient_type` (adam, as LESS); targets always use SGD gradients, as LESS does."""
    return FeatureSettings(
        gradient_type=less["gradient_type"] if kind == "train" else "sgd",
        projector=less["projector"],
        proj_dim=int(less["proj_dim"]),
        seed=int(less["proj_seed"]),
        adam_eps_placement=less["adam_eps_placement"],
        dtype=less["feature_dtype"],
    )


def checkpoint_features(
    dataset: Any,
    warmup_result: Mapping[str, Any],
    k: int,
    model_params: Mapping[str, Any],
    less: Mapping[str, Any],
    *,
    kind: str,
    name: str,
    seed: int = 0,
    progress: bool = True,
    train_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Features of `dataset` at warm-up checkpoint `k` through the datastore (reused when present); computed by
    train_params' num_processes workers, each on a share of the rows, when that is > 1."""
    if distributed(train_params):
        return launch(
            "dataflex.train.less:checkpoint_features",
            train_params or {},
            datasets={"dataset": dataset},
            kwargs={
                "warmup_result": dict(warmup_result),
                "k": k,
                "model_params": dict(model_params),
                "less": dict(less),
                "kind": kind,
                "name": name,
                "seed": seed,
                "progress": progress,
                "train_params": dict(train_params or {}),
            },
        )
    ckpt = warmup_result["checkpoints"][k]
    model = load_checkpoint_model(model_params, ckpt["path"], seed)
    settings = feature_settings(less, kind)
    store = GradientDatastore(less["datastore_dir"], shard_size=int(less["shard_size"]))
    ref = store.extract(
        model,
        dataset,
        settings,
        base_model_id=model_fingerprint(model_params["model_name_or_path"]),
        optimizer_state=ckpt["path"] if settings.gradient_type == "adam" else None,
        batch_size=int(less["feature_batch_size"]),
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
    less: Mapping[str, Any],
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """Score the pool for every target, pick the top ones and write the selection files."""
    lrs = [c["avg_lr"] for c in warmup_result["checkpoints"]]
    train_feats = [GradientDatastore.load(r).features for r in train_refs]
    out = Path(less["output_dir"])
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
        target_set = targets[target]
        feats = [GradientDatastore.load(refs[target]).features for refs in target_refs]
        subtasks = list(target_set["domain_id"])
        scores = less_scores(train_feats, feats, lrs, subtasks, less["aggregation"])
        picked = top_k(scores, percentage=less["percentage"], max_samples=less["max_samples"])
        table[target] = scores
        counts = [0] * len(names)
        for i in picked:
            counts[pool_domains[i]] += 1
        selection = {
            "target": target,
            "indices": [sample_ids[i] for i in picked],
            "scores": [float(scores[i]) for i in picked],
            "aggregation": less["aggregation"],
            "percentage": less["percentage"],
            "max_samples": less["max_samples"],
            "checkpoint_lrs": lrs,
            "domain_counts": dict(zip(names, counts)),
        }
        atomic_write_json(out / "selections" / f"{target}.json", selection)
        atomic_write_text(out / "selected" / f"{target}.jsonl", selected_jsonl(train_pool, picked, data))
        summary["targets"][target] = {k: v for k, v in selection.items() if k not in ("scores",)}
        summary["targets"][target]["score_stats"] = _stats(scores)
        logger.info(
            "LESS selected %d of %d samples for %s: %s",
            len(picked),
            len(train_pool),
            target,
            ", ".join(f"{n}={c}" for n, c in zip(names, counts) if c),
        )
    atomic_write_text(out / "scores.csv", score_table(train_pool, table))
    summary["scores_path"] = str(out / "scores.csv")
    return summary


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


def selected_jsonl(train_pool: Any, picked: list[int], data: Mapping[str, Any]) -> str:
    """The selected samples as their raw rows (the dataset's own columns), one JSON object per line, in score
    order, so the subset can be trained on with any LLaMA-Factory-style tool."""
    names = domain_names(train_pool)
    attrs = {a.name: a for a in resolve_datasets(names, data["dataset_dir"])}
    raw = {name: read_rows(attrs[name], data["dataset_dir"]) for name in names}
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
    train_pool: Any,
    selection: Mapping[str, Any],
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    less: Mapping[str, Any],
    metrics_sink: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """A fresh model from the base, trained `final_epochs` epochs on the selected subset (LESS's step 5)."""
    indices = selected_indices(selection)
    subset = train_pool.select(indices)
    train = {**dict(train_params), "num_train_epochs": float(less["final_epochs"]), "max_steps": -1}
    result = train_model(subset, model_params, train, metrics_sink=metrics_sink)
    return {**result, "train_type": "less", "selected_samples": len(indices), "targets": list(selection["targets"])}
