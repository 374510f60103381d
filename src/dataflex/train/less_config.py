"""The `less` parameter group (flat YAML keys `less_<key>`): typed settings and their checks (light: no model or
data is loaded here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dataflex.core.schema import Schema, setting

# The implementations' own names (dataflex.features: AGGREGATIONS, GRADIENT_TYPES, PROJECTORS, FEATURE_DTYPES) are
# repeated here so the config layer need not import torch; tests/unit/test_config_schema.py keeps them equal.
AGGREGATIONS = ("max", "mean")
GRADIENT_TYPES = ("adam", "sgd", "sign")
PROJECTORS = ("sjlt", "rademacher", "none")
EPS_PLACEMENTS = ("inside", "outside")
FEATURE_DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


@dataclass(frozen=True)
class LessConfig(Schema):
    """The `less` pipeline: warm-up, gradient datastore, selection per target, final training."""

    group: ClassVar[str] = "less"
    flat_prefix: ClassVar[str | None] = "less_"

    targets: str | list[str | list[str]] = setting(
        [], "target tasks: dev-set names; a target with subtasks is a list [a, b] or a+b; a string t1,t2 is two targets"
    )
    warmup_percentage: float = setting(
        0.05, "random share of the pool for the LoRA warm-up (seeded by train.seed)", gt=0, le=1
    )
    warmup_epochs: int = setting(4, "warm-up epochs; one checkpoint and one feature round per epoch", ge=1)
    percentage: float = setting(
        0.05, "share of the pool selected per target (int(percentage x N), at least 1)", gt=0, le=1
    )
    max_samples: int | None = setting(None, "a fixed number to select instead of percentage", ge=1)
    aggregation: str = setting(
        "max",
        "max: mean within each subtask, max over subtasks (LESS); mean: mean over all target examples (DataFlex)",
        choices=AGGREGATIONS,
    )
    gradient_type: str = setting(
        "adam", "pool features: LESS's Adam transform (the checkpoint's moments), sgd or sign", choices=GRADIENT_TYPES
    )
    projector: str = setting(
        "sjlt", "sjlt (sparse JL), rademacher (dense +-1/sqrt(k)), none (raw gradients)", choices=PROJECTORS
    )
    proj_dim: int = setting(8192, "projection dimension k", ge=1)
    proj_seed: int = setting(0, "projection seed (per parameter name)", ge=0)
    adam_eps_placement: str = setting(
        "inside", "epsilon inside the sqrt (LESS) or outside (DataFlex)", choices=EPS_PLACEMENTS
    )
    feature_dtype: str = setting("float32", "stored feature dtype", choices=FEATURE_DTYPES)
    feature_batch_size: int = setting(16, "samples per batched backward pass", ge=1)
    shard_size: int = setting(1024, "samples per datastore shard (the unit of resume)", ge=1)
    datastore_dir: str = setting("data/04_feature", "the gradient datastore (shared by every run)")
    warmup_dir: str = setting("data/06_models/warmup/less", "warm-up checkpoints, keyed by content")
    final_epochs: int = setting(4, "epochs of the final training on the selection", ge=1)


# Derived, never written by hand: the plain-dict defaults other modules merge into.
DEFAULTS: dict[str, Any] = LessConfig().to_dict()


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
    """Every LESS setting, before any work; with `data`, also that each target is a known dataset.

    A thin wrapper: the checks live in `dataflex.config.validate` (the one home of cross-field checks)."""
    from dataflex.config.validate import check_less

    check_less(LessConfig.from_dict(less), (data or {}).get("dataset_dir"))
