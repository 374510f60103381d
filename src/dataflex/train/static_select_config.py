"""Settings of one-shot selection (`static_select` parameter group, flat YAML keys `static_select_<key>`) and
their checks: light, so the config layer and the CLI can validate before importing models or data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.train.less_config import target_list

DEFAULTS: dict[str, Any] = {
    "selector": "near",  # any registered selector: near | tsds | cluster_less | nice | less | loss | random ...
    "params": {},  # its parameters, as under selectors.<name>.params in components.yaml
    "targets": [],  # target dev sets, as less.targets
    "percentage": 0.05,
    "max_samples": None,
    "warmup_epochs": 0,  # > 0: LESS's warm-up first; features at its last checkpoint (needed for adam features)
    "warmup_percentage": 0.05,
    "warmup_dir": "data/06_models/static_select/warmup",
    "cache_dir": "data/04_feature/static_select",
    "output_dir": "data/05_model_input/static_select",
    "final_epochs": 4,
}


def check_config(cfg: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> None:
    """Every setting, before any work: one ConfigError line for the first problem."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join('static_select.' + k for k in unknown)}; "
            f"valid: {', '.join(sorted(DEFAULTS))}"
        )
    import dataflex.train.selector  # noqa: F401  (registers the selectors)

    REGISTRY.check("selector", cfg.get("selector"), cfg.get("params") or {})
    if not target_list(cfg) or not all(target_list(cfg)):
        raise ConfigError("static_select.targets is empty: name the target task's dev set(s), e.g. [arith_dev]")
    if cfg.get("max_samples") is not None:
        m = cfg["max_samples"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"static_select.max_samples must be an integer >= 1 or null, got {m!r}")
    else:
        p = cfg.get("percentage")
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ConfigError(f"static_select.percentage must be a fraction in (0, 1], got {p!r}")
    for key, low in (("warmup_epochs", 0), ("final_epochs", 1)):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"static_select.{key} must be an integer >= {low}, got {v!r}")
    if data is not None and (Path(data["dataset_dir"]) / "dataset_info.json").is_file():
        from dataflex.data.dataset_info import resolve_datasets

        for target in target_list(cfg):
            resolve_datasets(target, data["dataset_dir"])
