"""The `less` parameter group: defaults and validation (light: no model or data is loaded here)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dataflex.core.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "targets": [],  # each: a dataset name, or a list of names (its subtasks)
    "warmup_percentage": 0.05,
    "warmup_epochs": 4,
    "percentage": 0.05,
    "max_samples": None,
    "aggregation": "max",  # max over subtasks of the mean within each (LESS) | mean over all target examples
    "gradient_type": "adam",
    "projector": "sjlt",
    "proj_dim": 8192,
    "proj_seed": 0,
    "adam_eps_placement": "inside",
    "feature_dtype": "float32",
    "feature_batch_size": 16,
    "shard_size": 1024,
    "datastore_dir": "data/04_feature",
    "warmup_dir": "data/06_models/less/warmup",
    "output_dir": "data/05_model_input/less",
    "final_epochs": 4,
}


def target_list(less: Mapping[str, Any]) -> list[list[str]]:
    """`targets` as a list of targets, each a list of dataset names (its subtasks).

    Accepted: a list whose items are a name, "a+b" or a list of names; or one string "t1,t2" (what
    `--params less.targets=...` and `key=value` overrides give), where a target with subtasks is "a+b"."""
    raw = less.get("targets") or []
    items = [t.strip() for t in raw.split(",") if t.strip()] if isinstance(raw, str) else list(raw)
    out = []
    for t in items:
        names = [str(n).strip() for n in t] if isinstance(t, list | tuple) else str(t).split("+")
        out.append([n for n in names if n])
    return out


def target_names(less: Mapping[str, Any]) -> list[str]:
    """A stable name per target: the dataset name, or its subtask names joined by '+'."""
    return ["+".join(t) for t in target_list(less)]


def check_less_config(less: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> None:
    """Every LESS setting, before any work; with `data`, also that each target is a known dataset."""
    unknown = sorted(set(less) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join('less.' + k for k in unknown)}; valid: {', '.join(sorted(DEFAULTS))}"
        )
    targets = target_list(less)
    if not targets or not all(targets):
        raise ConfigError("less.targets is empty: name the target task's dev set(s), e.g. targets: [arith_dev]")
    for key in ("warmup_percentage", "percentage"):
        value = less.get(key)
        if key == "percentage" and less.get("max_samples") is not None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ConfigError(f"less.{key} must be a fraction in (0, 1], got {value!r}")
    for key in ("warmup_epochs", "proj_dim", "feature_batch_size", "shard_size", "final_epochs"):
        value = less.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"less.{key} must be an integer >= 1, got {value!r}")
    if less.get("max_samples") is not None:
        m = less["max_samples"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"less.max_samples must be an integer >= 1 or null, got {m!r}")
    from dataflex.features.datastore import FeatureSettings
    from dataflex.features.matching import AGGREGATIONS
    from dataflex.features.projectors import PROJECTORS

    choices = {
        "aggregation": AGGREGATIONS,
        "gradient_type": ("adam", "sgd"),
        "projector": PROJECTORS,
        "adam_eps_placement": ("inside", "outside"),
    }
    for key, allowed in choices.items():
        if less.get(key) not in allowed:
            raise ConfigError(f"less.{key} must be one of {', '.join(allowed)}, got {less.get(key)!r}")
    FeatureSettings(dtype=less.get("feature_dtype"))
    if data is not None and (Path(data["dataset_dir"]) / "dataset_info.json").is_file():
        from dataflex.data.dataset_info import resolve_datasets

        for target in targets:
            resolve_datasets(target, data["dataset_dir"])
