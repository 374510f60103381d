"""Settings of one-shot selection (`static_select` parameter group, flat YAML keys `static_select_<key>`) and
their checks: light, so the config layer and the CLI can validate before importing models or data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dataflex.core.schema import Schema, setting


@dataclass(frozen=True)
class StaticSelectConfig(Schema):
    """The `static_select` pipeline: one selection by any registered selector, then training on it."""

    group: ClassVar[str] = "static_select"
    flat_prefix: ClassVar[str | None] = "static_select_"

    selector: str = setting(
        "near", "any registered selector for one-shot selection (near, tsds, cluster_less, nice, less, loss, ...)"
    )
    params: dict[str, Any] = setting(
        {}, "that selector's parameters (as under selectors.NAME.params in a components YAML)"
    )
    targets: str | list[str | list[str]] = setting([], "target dev sets, as less.targets")
    percentage: float = setting(0.05, "share of the pool to select (unless max_samples is set)", gt=0, le=1)
    max_samples: int | None = setting(None, "a fixed number to select instead of percentage", ge=1)
    warmup_epochs: int = setting(
        0, "> 0: LESS's cached warm-up first (model state and Adam moments for cluster_less / nice)", ge=0
    )
    warmup_percentage: float = setting(0.05, "random share of the pool for that warm-up", gt=0, le=1)
    warmup_dir: str = setting("data/06_models/warmup/static_select", "warm-up checkpoints")
    cache_dir: str = setting(
        "data/04_feature/static_select", "selector artefacts: embeddings, neighbours, clusters, datastore"
    )
    final_epochs: int = setting(4, "epochs of the final training on the selection", ge=1)


# Derived, never written by hand: the plain-dict defaults other modules merge into.
DEFAULTS: dict[str, Any] = StaticSelectConfig().to_dict()


def check_config(cfg: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> None:
    """Every setting, before any work: one ConfigError line for the first problem.

    A thin wrapper: the checks live in `dataflex.config.validate` (the one home of cross-field checks)."""
    from dataflex.config.validate import check_static_select

    check_static_select(StaticSelectConfig.from_dict(cfg), (data or {}).get("dataset_dir"))
