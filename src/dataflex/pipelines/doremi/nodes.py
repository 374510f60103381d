"""Nodes of DoReMi's three steps: reference (static mix) -> proxy (doremi mixer) -> final (static mix at the
proxy's averaged weights). Each step writes under its own output dir; the next reads the previous one's result.
Reference and proxy train `doremi.proxy_model_name_or_path` (the small proxy; null: the final model), the final
run trains `model_name_or_path`: the paper's point is a small proxy whose weights train a large model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dataflex.data import tokenizer_fingerprint
from dataflex.data.pools import build_pools
from dataflex.demo_assets import ensure_demo_proxy
from dataflex.models import load_tokenizer
from dataflex.pipelines.params import run_config
from dataflex.reporting import doremi_plot
from dataflex.tracking import log_mixture, mlflow_metrics_sink
from dataflex.train.modes import mix
from dataflex.utils.logging import logger


def _step(parameters: dict, step: str, sub: str | None, **kwargs: Any) -> Any:
    cfg = mix.doremi_config(run_config(parameters), step, **kwargs)
    if sub is None:
        return cfg
    return replace(cfg, train=replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / sub)))


def _trained_dir(result: dict) -> str:
    return result.get("adapter_dir") or result["model_dir"]


def proxy_pool(train_pool: Any, parameters: dict) -> Any:
    """The pool reference and proxy train on: the run's pool (tokenised for the final model) when the proxy model
    has the same tokenizer, else the same datasets tokenised with the proxy's (token ids are per tokenizer; the
    domains, which the weights are about, are the same). The tokenisation is cached by content."""
    cfg = run_config(parameters)
    model, proxy = cfg.model.model_name_or_path, mix.doremi_proxy_model(cfg)
    ensure_demo_proxy(cfg.demo, proxy)
    if proxy == model:
        return train_pool
    tokenizer = load_tokenizer(proxy)
    if tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_tokenizer(model)):
        return train_pool
    logger.info("doremi: the proxy model %s has its own tokenizer: tokenising the training data for it", proxy)
    return build_pools(cfg.data, tokenizer, seed=cfg.train.seed)[0]


def reference(train_pool: Any, parameters: dict) -> dict:
    cfg = _step(parameters, "reference", "reference")
    return mix.run_single_segment(cfg, proxy_pool(train_pool, parameters), mlflow_metrics_sink("reference/"))


def proxy(train_pool: Any, parameters: dict, reference_result: dict) -> tuple[dict, dict]:
    cfg = _step(parameters, "proxy", "proxy", reference_dir=_trained_dir(reference_result))
    result = mix.run_single_segment(cfg, proxy_pool(train_pool, parameters), mlflow_metrics_sink("proxy/"))
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
