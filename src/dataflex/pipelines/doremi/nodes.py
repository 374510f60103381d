"""Nodes of DoReMi's three steps: reference (static mix) -> proxy (doremi mixer) -> final (static mix at the
proxy's averaged weights). Each step writes under its own output dir; the next reads the previous one's result."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dataflex.pipelines.params import run_config
from dataflex.reporting import doremi_plot
from dataflex.tracking import log_mixture, mlflow_metrics_sink
from dataflex.train.modes import mix


def _step(parameters: dict, step: str, sub: str | None, **kwargs: Any) -> Any:
    cfg = mix.doremi_config(run_config(parameters), step, **kwargs)
    if sub is None:
        return cfg
    return replace(cfg, train=replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / sub)))


def _trained_dir(result: dict) -> str:
    return result.get("adapter_dir") or result["model_dir"]


def reference(train_pool: Any, parameters: dict) -> dict:
    cfg = _step(parameters, "reference", "reference")
    return mix.run_single_segment(cfg, train_pool, mlflow_metrics_sink("reference/"))


def proxy(train_pool: Any, parameters: dict, reference_result: dict) -> tuple[dict, dict]:
    cfg = _step(parameters, "proxy", "proxy", reference_dir=_trained_dir(reference_result))
    result = mix.run_single_segment(cfg, train_pool, mlflow_metrics_sink("proxy/"))
    return result, result["doremi"]


def final(train_pool: Any, parameters: dict, proxy_result: dict) -> tuple[dict, list]:
    weights = proxy_result["doremi_average_weights"]
    result = mix.run_single_segment(
        _step(parameters, "final", None, weights=weights), train_pool, mlflow_metrics_sink()
    )
    log_mixture(result["mixture_history"])
    return {**result, "train_type": "doremi", "doremi_average_weights": weights}, result["mixture_history"]


def plot(proxy_result: dict) -> Any:
    return doremi_plot(proxy_result["log_history"], proxy_result["domains"], proxy_result["doremi_average_weights"])
