"""Typed, validated configuration: grouped Kedro parameters <-> DataFlex / LLaMA-Factory flat YAML keys.

Kedro parameters are grouped (`model`, `data`, `train`, `dataflex`, `eval`, `demo`, `less`, `static_select`); each
group is a frozen dataclass (`RunConfig` holds them all) whose fields carry the key's default, constraints, flat
name and doc (dataflex.core.schema). Everything else is derived from them: `DEFAULTS`, `FLAT_KEYS`, and the
generated docs/config.md and docs/parameters.sample.yml. A DataFlex YAML is flat; keys DataFlex / LLaMA-Factory know
but this project does not use are accepted with a notice (`IGNORED_KEYS`); any other key is an error.

- `groups`: the dataclasses and `RunConfig.from_params` / `to_params`
- `flat`: flat YAML loading, overrides, `flat_to_grouped`, `resolve_paths`
- `validate`: every cross-field check (`validate`, `validate_params`)
- `reference` / `docs`: the generated reference (`python -m dataflex.config.docs --write`)
"""

from __future__ import annotations

from typing import Any

from dataflex.config.flat import (
    CONVERTED_KEYS,
    FLAT_KEYS,
    IGNORED_KEYS,
    SAME_OPTIMIZER,
    UNSUPPORTED_KEYS,
    default_params,
    flat_to_grouped,
    load_yaml_config,
    parse_overrides,
    resolve_paths,
)
from dataflex.config.groups import (
    DEMO_MODEL_SIZES,
    DTYPES,
    FINETUNING_TYPES,
    GROUPS,
    IMPLEMENTED_TRAIN_TYPES,
    STAGES,
    TRAIN_TYPES,
    DataConfig,
    DemoConfig,
    DynamicConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
)
from dataflex.config.reference import render_config_markdown, render_parameters_yaml
from dataflex.config.validate import PIPELINE_GROUPS, check_less, check_static_select, validate, validate_params
from dataflex.train.less_config import LessConfig
from dataflex.train.static_select_config import StaticSelectConfig
from dataflex.train.trainer.args import TrainingArguments

# Library defaults as grouped dicts, derived from the dataclasses (never written by hand).
DEFAULTS: dict[str, dict[str, Any]] = RunConfig().to_params()
LESS_DEFAULTS = DEFAULTS["less"]
STATIC_SELECT_DEFAULTS = DEFAULTS["static_select"]

__all__ = [
    "CONVERTED_KEYS",
    "DEFAULTS",
    "DEMO_MODEL_SIZES",
    "DTYPES",
    "FINETUNING_TYPES",
    "FLAT_KEYS",
    "GROUPS",
    "IGNORED_KEYS",
    "IMPLEMENTED_TRAIN_TYPES",
    "LESS_DEFAULTS",
    "PIPELINE_GROUPS",
    "SAME_OPTIMIZER",
    "STAGES",
    "STATIC_SELECT_DEFAULTS",
    "TRAIN_TYPES",
    "UNSUPPORTED_KEYS",
    "DataConfig",
    "DemoConfig",
    "DynamicConfig",
    "EvalConfig",
    "LessConfig",
    "ModelConfig",
    "RunConfig",
    "StaticSelectConfig",
    "TrainingArguments",
    "check_less",
    "check_static_select",
    "default_params",
    "flat_to_grouped",
    "load_yaml_config",
    "parse_overrides",
    "render_config_markdown",
    "render_parameters_yaml",
    "resolve_paths",
    "validate",
    "validate_params",
]
