"""Nodes: the trained model as a catalog dataset, and its evaluation on every eval set."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dataflex.evaluation import evaluate_sets
from dataflex.models import load_tokenizer
from dataflex.pipelines.params import run_config
from dataflex.tracking import log_eval_metrics
from dataflex.train.run import build_model


def trained_model(train_result: dict) -> dict:
    """Where the run core saved the trained adapter / model (`dataflex.io.TrainedModelDataset` verifies it)."""
    kind = "adapter" if "adapter_dir" in train_result else "model"
    path = train_result[f"{kind}_dir"]
    return {"kind": kind, "path": path, "base_model": train_result["model_name_or_path"]}


def evaluate(trained: dict, eval_sets: Any, parameters: dict) -> dict:
    if not len(eval_sets):
        return {}
    cfg = run_config(parameters)
    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    if trained["kind"] == "adapter":
        net = build_model(cfg.model, seed=cfg.train.seed, adapter_path=trained["path"])
    else:
        net = build_model(replace(cfg.model, model_name_or_path=trained["path"]), seed=cfg.train.seed)
    metrics = evaluate_sets(
        net,
        tokenizer,
        eval_sets,
        batch_size=cfg.train.per_device_eval_batch_size,
        generate=cfg.eval.generate,
        max_new_tokens=cfg.eval.max_new_tokens,
        max_generate_samples=cfg.eval.max_generate_samples,
        stage=cfg.data.stage,
    )
    log_eval_metrics(metrics)
    return metrics
