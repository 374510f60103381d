"""Node: evaluate the trained model on every eval set."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dataflex.evaluation import evaluate_sets
from dataflex.models import load_tokenizer
from dataflex.pipelines.params import run_config
from dataflex.tracking import log_eval_metrics
from dataflex.train.run import build_model


def evaluate(train_result: dict, eval_sets: Any, parameters: dict) -> dict:
    if not len(eval_sets):
        return {}
    cfg = run_config(parameters)
    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    if cfg.model.finetuning_type == "lora":
        net = build_model(cfg.model, seed=cfg.train.seed, adapter_path=train_result["adapter_dir"])
    else:
        net = build_model(replace(cfg.model, model_name_or_path=train_result["model_dir"]), seed=cfg.train.seed)
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
