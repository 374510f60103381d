"""`dynamic_mix`: process -> round_0 (warmup segment) -> round_k (compute_mixture -> train_segment) ... -> finalize
-> evaluate -> report. Rounds are namespaces `dynamic_mix.round_<k>`; their count comes from the parameters."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.params import current_params
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import compute_mixture, finalize, first_segment, next_segment, plot_mixture

SHARED = {"params:model", "params:train", "params:dataflex"}
PARAMS = ["params:model", "params:train", "params:dataflex"]


def rounds_from_params(params: dict[str, Any] | None) -> int:
    """1 + number of mixer updates, known before the data is (update_times >= 1, or train_step > 0)."""
    flex = (params or {}).get("dataflex") or {}
    if flex.get("static_mix"):
        return 1
    w, u, t, total = (int(flex.get(k) or 0) for k in ("warmup_step", "update_step", "update_times", "train_step"))
    if t >= 1:
        return 1 + t
    if total > w >= 1 and u >= 1:
        return 1 + -(-(total - w) // u)
    return 1  # not a valid dynamic config: the run's validation says why


def create_pipeline(n_rounds: int | None = None, **kwargs: Any) -> Pipeline:
    n = n_rounds if n_rounds is not None else rounds_from_params(current_params())
    rounds = [
        Pipeline(
            [Node(first_segment, ["train_pool", *PARAMS], "state", name="train_segment")],
            namespace="dynamic_mix.round_0",
            inputs={"train_pool"},
            parameters=SHARED,
        )
    ]
    for k in range(1, n):
        rounds.append(
            Pipeline(
                [
                    Node(compute_mixture, ["train_pool", *PARAMS, "prev_state"], "mixture", name="compute_mixture"),
                    Node(next_segment, ["train_pool", *PARAMS, "prev_state", "mixture"], "state", name="train_segment"),
                ],
                namespace=f"dynamic_mix.round_{k}",
                inputs={"train_pool": "train_pool", "prev_state": f"dynamic_mix.round_{k - 1}.state"},
                parameters=SHARED,
            )
        )
    mixtures = [f"dynamic_mix.round_{k}.mixture" for k in range(1, n)]
    wrap_up = Pipeline(
        [
            Node(
                finalize,
                [f"dynamic_mix.round_{n - 1}.state", "train_pool", *PARAMS, *mixtures],
                "train_result",
                name="dynamic_mix.finalize",
            ),
            Node(plot_mixture, "train_result", "mixture_plot", name="dynamic_mix.plot_mixture"),
        ]
    )
    return data_processing() + Pipeline(rounds, tags="dynamic_mix") + wrap_up + evaluation() + reporting()
