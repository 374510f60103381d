"""Thin nodes over `dataflex.train.less`: warm-up, per-checkpoint features, matching, final training, plots."""

from __future__ import annotations

import csv
from collections.abc import Callable
from typing import Any

import mlflow

from dataflex.models import load_tokenizer
from dataflex.reporting import score_histogram, selection_composition_plot
from dataflex.tracking import metric_key, mlflow_metrics_sink
from dataflex.train import less as lib
from dataflex.train.less_config import check_less_config


def prepare_targets(raw_inputs: dict, data: dict, train: dict, less: dict) -> Any:
    check_less_config(less, data)
    return lib.build_targets(data, less, load_tokenizer(raw_inputs["model_name_or_path"]), seed=train["seed"])


def warmup(train_pool: Any, model: dict, train: dict, less: dict) -> dict:
    result = lib.warmup(train_pool, model, train, less, metrics_sink=mlflow_metrics_sink("less/warmup/"))
    _log({"less/warmup_cache_hit": float(result["cache"] == "hit")})
    return result


def _log(metrics: dict[str, float]) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_metrics({metric_key(k): v for k, v in metrics.items()})


def _log_cache(ref: dict, prefix: str) -> None:
    _log(
        {
            f"{prefix}_cache_hit": float(ref["status"] == "hit"),
            f"{prefix}_computed_samples": ref["computed_samples"],
            f"{prefix}_seconds": ref["seconds"],
        }
    )


def train_features_at(k: int) -> Callable[..., dict]:
    def train_features(train_pool: Any, warmup_result: dict, model: dict, train: dict, less: dict) -> dict:
        ref = lib.checkpoint_features(
            train_pool,
            warmup_result,
            k,
            model,
            less,
            kind="train",
            name="pool",
            seed=train["seed"],
            progress=train.get("progress_bar", True),
            train_params=train,
        )
        _log_cache(ref, f"less/ckpt_{k}/datastore")
        return ref

    return train_features


def target_features_at(k: int) -> Callable[..., dict]:
    def target_features(target_sets: Any, warmup_result: dict, model: dict, train: dict, less: dict) -> dict:
        refs = {}
        for name in target_sets:
            refs[name] = lib.checkpoint_features(
                target_sets[name],
                warmup_result,
                k,
                model,
                less,
                kind="target",
                name=name,
                seed=train["seed"],
                progress=False,
            )
            # (targets are dev sets of a few samples: computed here, worker start-up would dominate)
            _log_cache(refs[name], f"less/ckpt_{k}/target/{name}")
        return refs

    return target_features


def select(train_pool: Any, target_sets: Any, warmup_result: dict, less: dict, data: dict, *refs: dict) -> dict:
    n = len(refs) // 2
    return lib.select(train_pool, target_sets, warmup_result, list(refs[:n]), list(refs[n:]), less, data)


def final_train(train_pool: Any, selection: dict, model: dict, train: dict, less: dict) -> dict:
    return lib.final_train(train_pool, selection, model, train, less, metrics_sink=mlflow_metrics_sink())


def plot_composition(selection: dict) -> Any:
    return selection_composition_plot(selection)


def plot_scores(selection: dict) -> Any:
    with open(selection["scores_path"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    targets = list(selection["targets"])
    scores = {t: [float(r[t]) for r in rows] for t in targets}
    cutoffs = {t: min(scores[t][i] for i in _positions(rows, selection["targets"][t]["indices"])) for t in targets}
    return score_histogram(scores, [r["domain"] for r in rows], cutoffs)


def _positions(rows: list[dict], sample_ids: list[int]) -> list[int]:
    where = {int(r["sample_id"]): i for i, r in enumerate(rows)}
    return [where[s] for s in sample_ids]
