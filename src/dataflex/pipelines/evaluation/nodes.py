"""Node: evaluate the trained model on every eval set."""

from __future__ import annotations

from typing import Any

from dataflex.evaluation import evaluate_sets
from dataflex.models import load_tokenizer
from dataflex.tracking import log_eval_metrics
from dataflex.train.runner import build_model


def evaluate(train_result: dict, eval_sets: Any, model: dict, data: dict, train: dict, eval: dict) -> dict:
    if not len(eval_sets):
        return {}
    tokenizer = load_tokenizer(model["model_name_or_path"])
    if model["finetuning_type"] == "lora":
        net = build_model(model, seed=train["seed"], adapter_path=train_result["adapter_dir"])
    else:
        net = build_model({**model, "model_name_or_path": train_result["model_dir"]}, seed=train["seed"])
    metrics = evaluate_sets(
        net,
        tokenizer,
        eval_sets,
        batch_size=train["per_device_eval_batch_size"],
        generate=eval["generate"],
        max_new_tokens=eval["max_new_tokens"],
        max_generate_samples=eval["max_generate_samples"],
        stage=data["stage"],
    )
    log_eval_metrics(metrics)
    return metrics
