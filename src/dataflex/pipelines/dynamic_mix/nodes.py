"""Nodes of the unrolled dynamic-mix loop: one training segment per round, the mixer between rounds. Every node
gets the `mixer_eval_sets` (`mixer_eval_dataset`, empty when unset), which the mixer may take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataflex.pipelines.params import run_config
from dataflex.reporting import mixture_plot
from dataflex.tracking import log_mixture, mlflow_metrics_sink
from dataflex.train.modes import mix


def _cfg(parameters: dict) -> Any:
    return run_config(parameters, "dynamic_mix")


def first_segment(train_pool: Any, mixer_eval_sets: Any, eval_sets: Any, parameters: dict) -> dict:
    sink = mlflow_metrics_sink()
    evals = {"mixer_eval_sets": mixer_eval_sets, "eval_sets": eval_sets}
    return mix.train_segment(_cfg(parameters), train_pool, 0, metrics_sink=sink, **evals)


def compute_mixture(train_pool: Any, mixer_eval_sets: Any, parameters: dict, prev_state: dict) -> dict:
    return mix.compute_mixture(_cfg(parameters), train_pool, prev_state, mixer_eval_sets=mixer_eval_sets)


def next_segment(
    train_pool: Any, mixer_eval_sets: Any, eval_sets: Any, parameters: dict, prev_state: dict, mixture: dict
) -> dict:
    k = prev_state["round"] + 1
    sink = mlflow_metrics_sink()
    evals = {"mixer_eval_sets": mixer_eval_sets, "eval_sets": eval_sets}
    return mix.train_segment(_cfg(parameters), train_pool, k, prev_state, mixture, metrics_sink=sink, **evals)


def _log_expert_loads(result: dict) -> None:
    """The dynamic_moe mixer's expert-load heat maps (written by the mixer under output_dir) as an MLflow artifact."""
    import mlflow

    from dataflex.tracking import never_fatal

    path = Path(result["output_dir"]) / "mixture" / "expert_loads.png"
    if path.is_file() and mlflow.active_run() is not None:
        never_fatal(mlflow.log_artifact)(str(path))


def finalize(last_state: dict, *mixtures: dict) -> tuple[dict, list]:
    result = mix.finalize(last_state, list(mixtures))
    log_mixture(result["mixture_history"])
    _log_expert_loads(result)
    return result, result["mixture_history"]


def all_rounds(train_pool: Any, mixer_eval_sets: Any, eval_sets: Any, parameters: dict) -> tuple[dict, list]:
    """Every round in one node: when the round count depends on the pool's size (`update_times <= 0` bounded by
    the epochs), the pipeline cannot unroll them before the data is read."""
    cfg = _cfg(parameters)
    evals = {"mixer_eval_sets": mixer_eval_sets, "eval_sets": eval_sets}
    result = mix.run_all(cfg, train_pool, metrics_sink=mlflow_metrics_sink(), **evals)
    log_mixture(result["mixture_history"])
    _log_expert_loads(result)
    return result, result["mixture_history"]


def plot_mixture(train_result: dict) -> Any:
    return mixture_plot(train_result["mixture_history"], train_result["global_step"])
