"""Nodes of DoReMi's three steps: reference (static mix) -> proxy (doremi mixer) -> final (static mix at the
proxy's averaged weights). Each step writes under its own output dir; the next reads the previous one's result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataflex.reporting import doremi_plot
from dataflex.tracking import log_mixture, mlflow_metrics_sink
from dataflex.train import mix


def _train(train: dict, sub: str | None) -> dict:
    return {**train, "output_dir": str(Path(train["output_dir"]) / sub) if sub else train["output_dir"]}


def _trained_dir(result: dict) -> str:
    return result.get("adapter_dir") or result["model_dir"]


def reference(train_pool: Any, model: dict, train: dict, dataflex: dict) -> dict:
    flex = mix.doremi_flex(dataflex, "reference")
    return mix.run_single_segment(
        train_pool, model, _train(train, "reference"), flex, mlflow_metrics_sink("reference/")
    )


def proxy(train_pool: Any, model: dict, train: dict, dataflex: dict, reference_result: dict) -> dict:
    flex = mix.doremi_flex(dataflex, "proxy", reference_dir=_trained_dir(reference_result))
    return mix.run_single_segment(train_pool, model, _train(train, "proxy"), flex, mlflow_metrics_sink("proxy/"))


def final(train_pool: Any, model: dict, train: dict, dataflex: dict, proxy_result: dict) -> dict:
    flex = mix.doremi_flex(dataflex, "final", weights=proxy_result["doremi_average_weights"])
    result = mix.run_single_segment(train_pool, model, _train(train, None), flex, mlflow_metrics_sink())
    log_mixture(result["mixture_history"])
    return {**result, "train_type": "doremi", "doremi_average_weights": proxy_result["doremi_average_weights"]}


def plot(proxy_result: dict) -> Any:
    return doremi_plot(proxy_result["log_history"], proxy_result["domains"], proxy_result["doremi_average_weights"])
