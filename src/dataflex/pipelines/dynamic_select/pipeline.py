"""`dynamic_select`: process -> round_0 (warmup segment) -> round_k (compute_features -> compute_selection ->
train_segment) ... -> finalize -> evaluate -> report. Rounds are namespaces `dynamic_select.round_<k>`; their
count comes from the parameters (one per selection, plus the warmup round)."""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Node, Pipeline

from dataflex.core.errors import DataFlexError
from dataflex.pipelines.data_processing import create_pipeline as data_processing
from dataflex.pipelines.evaluation import create_pipeline as evaluation
from dataflex.pipelines.params import current_params
from dataflex.pipelines.reporting import create_pipeline as reporting

from .nodes import compute_features, compute_selection, finalize, first_segment, next_segment, plot_selection

SHARED = {"params:model", "params:train", "params:dataflex"}
INPUTS = ["train_pool", "eval_sets", "params:model", "params:train", "params:dataflex"]


def rounds_from_params(params: dict[str, Any] | None) -> int:
    """1 + number of selections, known before the data is (update_times >= 1, or train_step > 0)."""
    from dataflex.train.select import select_schedule

    params = params or {}
    try:
        return select_schedule(params.get("dataflex") or {}, params.get("train") or {}, None).num_rounds
    except (DataFlexError, KeyError, TypeError, ValueError):
        return 1  # not a valid dynamic_select config: the run's validation says why


def create_pipeline(n_rounds: int | None = None, **kwargs: Any) -> Pipeline:
    n = n_rounds if n_rounds is not None else rounds_from_params(current_params())
    rounds = [
        Pipeline(
            [Node(first_segment, INPUTS, "state", name="train_segment")],
            namespace="dynamic_select.round_0",
            inputs={"train_pool", "eval_sets"},
            parameters=SHARED,
        )
    ]
    for k in range(1, n):
        rounds.append(
            Pipeline(
                [
                    Node(compute_features, [*INPUTS, "prev_state"], "features", name="compute_features"),
                    Node(compute_selection, [*INPUTS, "prev_state", "features"], "selection", name="compute_selection"),
                    Node(next_segment, [*INPUTS, "prev_state", "selection"], "state", name="train_segment"),
                ],
                namespace=f"dynamic_select.round_{k}",
                inputs={
                    "train_pool": "train_pool",
                    "eval_sets": "eval_sets",
                    "prev_state": f"dynamic_select.round_{k - 1}.state",
                },
                parameters=SHARED,
            )
        )
    selections = [f"dynamic_select.round_{k}.selection" for k in range(1, n)]
    wrap_up = Pipeline(
        [
            Node(
                finalize,
                [
                    f"dynamic_select.round_{n - 1}.state",
                    "train_pool",
                    "params:model",
                    "params:train",
                    "params:dataflex",
                    *selections,
                ],
                "train_result",
                name="dynamic_select.finalize",
            ),
            Node(plot_selection, "train_result", "selection_plot", name="dynamic_select.plot_selection"),
        ]
    )
    return data_processing() + Pipeline(rounds, tags="dynamic_select") + wrap_up + evaluation() + reporting()
