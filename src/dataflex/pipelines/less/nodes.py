"""Thin nodes over `dataflex.train.modes.less`: warm-up, per-checkpoint features, matching, final training, plots."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dataflex.models import load_tokenizer
from dataflex.pipelines.params import run_config
from dataflex.reporting import score_histogram, selection_composition_plot
from dataflex.tracking import log_metrics, mlflow_metrics_sink
from dataflex.train.modes import less as lib


def prepare_targets(raw_inputs: dict, parameters: dict) -> Any:
    cfg = run_config(parameters)
    return lib.build_targets(
        cfg.data, cfg.less.targets, load_tokenizer(raw_inputs["model_name_or_path"]), seed=cfg.train.seed
    )


def warmup(train_pool: Any, parameters: dict) -> dict:
    cfg = run_config(parameters)
    less, sink = cfg.less, mlflow_metrics_sink("less/warmup/")
    result = lib.warmup(cfg, train_pool, less.warmup_percentage, less.warmup_epochs, less.warmup_dir, metrics_sink=sink)
    log_metrics({"less/warmup_cache_hit": float(result["cache"] == "hit")})
    return result


def _log_cache(ref: dict, prefix: str) -> None:
    hit = float(ref["status"] == "hit")
    log_metrics({f"{prefix}_cache_hit": hit, f"{prefix}_computed_samples": ref["computed_samples"]})
    log_metrics({f"{prefix}_seconds": ref["seconds"]})


def train_features_at(k: int) -> Callable[..., dict]:
    def train_features(train_pool: Any, warmup_result: dict, parameters: dict) -> dict:
        cfg = run_config(parameters)
        progress = cfg.train.progress_bar
        ref = lib.checkpoint_features(cfg, train_pool, warmup_result, k, "train", "pool", progress=progress)
        _log_cache(ref, f"less/ckpt_{k}/datastore")
        return ref

    return train_features


def target_features_at(k: int) -> Callable[..., dict]:
    def target_features(target_sets: Any, warmup_result: dict, parameters: dict) -> dict:
        cfg = run_config(parameters)
        # Targets are dev sets of a few samples: computed here, where worker start-up would dominate.
        local = replace(cfg, train=replace(cfg.train, num_processes=1))
        refs = {}
        for name in target_sets:
            ref = lib.checkpoint_features(local, target_sets[name], warmup_result, k, "target", name, progress=False)
            refs[name] = ref
            _log_cache(ref, f"less/ckpt_{k}/target/{name}")
        return refs

    return target_features


def select(train_pool: Any, target_sets: Any, warmup_result: dict, parameters: dict, *refs: dict) -> dict:
    cfg, n = run_config(parameters), len(refs) // 2
    return lib.select(train_pool, target_sets, warmup_result, list(refs[:n]), list(refs[n:]), cfg.less, cfg.data)


def final_train(train_pool: Any, selection: dict, parameters: dict) -> dict:
    cfg = run_config(parameters)
    return lib.final_train(cfg, train_pool, selection, cfg.less.final_epochs, metrics_sink=mlflow_metrics_sink())


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
