"""The typed config (dataflex.core.schema, dataflex.config): one home per key, checks as one line, generated docs
that cannot go stale, and no default written twice."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from dataflex.config import (
    DEFAULTS,
    FLAT_KEYS,
    GROUPS,
    RunConfig,
    TrainingArguments,
    flat_to_grouped,
    parse_overrides,
    render_parameters_yaml,
    validate,
    validate_params,
)
from dataflex.config.docs import generated_files
from dataflex.core.errors import ConfigError
from dataflex.core.schema import describe

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "dataflex"


def _one_line_error(params: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_params(params)
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("path", sorted(p.name for p in generated_files()))
def test_generated_docs_are_current(path):
    """docs/config.md and docs/parameters.sample.yml are what the schema renders now (else: regenerate them)."""
    expected = {p.name: text for p, text in generated_files().items()}[path]
    written = ROOT / "docs" / path
    assert written.is_file(), f"{written} is missing: run python -m dataflex.config.docs --write"
    assert written.read_text() == expected, f"{written} is stale: run python -m dataflex.config.docs --write"


def test_parameters_sample_holds_every_default():
    assert yaml.safe_load(render_parameters_yaml()) == RunConfig().to_params()


def test_conf_base_parameters_are_in_the_schema():
    params = yaml.safe_load((ROOT / "conf" / "base" / "parameters.yml").read_text())
    for group, values in params.items():
        assert group in GROUPS, f"conf/base/parameters.yml: unknown group {group}"
        fields = {f.name for f in dataclasses.fields(GROUPS[group])}
        assert not set(values) - fields, f"{group}: {sorted(set(values) - fields)} not in the schema"
    run_config = RunConfig.from_params(params)
    validate(run_config, check_paths=False)
    assert run_config.model.lora_alpha == params["model"]["lora_alpha"]


def test_round_trip_and_derived_defaults():
    assert RunConfig.from_params(RunConfig().to_params()) == RunConfig()
    assert RunConfig.from_params({}) == RunConfig()  # missing groups take their defaults
    assert DEFAULTS == RunConfig().to_params()
    from dataflex.train import less_config, static_select_config

    assert less_config.DEFAULTS == DEFAULTS["less"] and static_select_config.DEFAULTS == DEFAULTS["static_select"]


@pytest.mark.parametrize("raw, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_nan_and_inf_are_refused_by_name(raw, shown):
    params = flat_to_grouped(parse_overrides([f"learning_rate={raw}"]))
    assert math.isnan(params["train"]["learning_rate"]) or math.isinf(params["train"]["learning_rate"])
    with pytest.raises(ConfigError) as exc:
        validate_params(params, check_paths=False)
    assert str(exc.value) == f"train.learning_rate must be a finite number > 0, got {shown}"
    text = _one_line_error({"dataflex": {"init_mixture_proportions": [0.5, float(shown)]}})
    assert text.startswith("dataflex.init_mixture_proportions must hold only finite numbers")


def test_bool_is_not_an_int_nor_a_float():
    assert _one_line_error({"model": {"lora_rank": True}}) == "model.lora_rank must be a positive integer, got True"
    assert _one_line_error({"train": {"learning_rate": True}}).startswith("train.learning_rate must be a number")
    with pytest.raises(ConfigError, match="train.seed must be an integer >= 0, got False"):
        TrainingArguments(seed=False)


def test_types_ranges_and_choices():
    assert _one_line_error({"train": {"learning_rate": -1.0}}) == "train.learning_rate must be > 0, got -1.0"
    assert _one_line_error({"model": {"lora_dropout": 1}}) == "model.lora_dropout must be in [0, 1), got 1"
    assert "stage 'dpo' is not valid; use one of sft, pt" in _one_line_error({"data": {"stage": "dpo"}})
    assert _one_line_error({"dataflex": {"user_modules": [1]}}).startswith("dataflex.user_modules must be")
    assert _one_line_error({"data": {"max_samples": 0}}) == "data.max_samples must be a positive integer or null, got 0"
    assert "max_steps must be a positive integer" in _one_line_error({"train": {"max_steps": -2}})
    # An int is a valid float and is kept as given (val_size 3 is a count, 0.3 a fraction).
    assert RunConfig.from_params({"data": {"val_size": 3}}).data.val_size == 3
    assert isinstance(RunConfig.from_params({"data": {"val_size": 3}}).data.val_size, int)
    assert RunConfig.from_params({"model": {"lora_alpha": None}}).model.lora_alpha is None
    # Computed values may be numpy scalars (a mixer's weights); numpy's bool is no more an int than bool is.
    import numpy as np

    assert RunConfig.from_params({"dataflex": {"init_mixture_proportions": [np.float32(0.5), np.int64(1)]}})
    assert "must be a positive integer" in _one_line_error({"model": {"lora_rank": np.bool_(True)}})


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): lora_rnak \(did you mean lora_rank\?\)"):
        flat_to_grouped({"lora_rnak": 8})
    with pytest.raises(ConfigError, match=r"less_percentag \(did you mean less_percentage\?\)"):
        flat_to_grouped({"less_percentag": 0.1})
    text = _one_line_error({"train": {"learning_rte": 1}})
    assert "train.learning_rte (did you mean train.learning_rate?)" in text and "valid: " in text
    with pytest.raises(ConfigError, match="zzz_qqq"):
        flat_to_grouped({"zzz_qqq": 1})


def test_flat_names_and_aliases_come_from_the_fields():
    assert FLAT_KEYS["infer_dtype"] == FLAT_KEYS["dtype"] == ("model", "dtype")
    assert FLAT_KEYS["predict_with_generate"] == ("eval", "generate") and "generate" not in FLAT_KEYS
    assert FLAT_KEYS["less_targets"] == ("less", "targets")
    assert FLAT_KEYS["static_select_selector"] == ("static_select", "selector")
    assert not any(group == "demo" for group, _ in FLAT_KEYS.values())
    assert flat_to_grouped({"bf16": True})["train"]["mixed_precision"] == "bf16"
    for cls in GROUPS.values():
        for info in describe(cls):
            assert info.doc and "\n" not in info.doc, f"{info.group}.{info.name} needs a one-line doc"
            for flat in info.flat:
                assert FLAT_KEYS[flat] == (info.group, info.name)


def test_training_arguments_are_frozen_and_checked():
    args = TrainingArguments.from_dict({"max_steps": 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.max_steps = 6  # type: ignore[misc]
    assert dataclasses.replace(args, max_steps=6).max_steps == 6
    with pytest.raises(ConfigError, match="num_train_epochs must be > 0"):
        TrainingArguments(num_train_epochs=0)
    assert TrainingArguments.from_dict(args.to_dict()) == args


def test_choice_copies_match_the_implementations():
    """The config repeats a few implementation tuples to stay light; they must not drift."""
    from dataflex.config import DEMO_MODEL_SIZES
    from dataflex.features.gradients import FEATURE_DTYPES, GRADIENT_TYPES
    from dataflex.features.matching import AGGREGATIONS
    from dataflex.features.projectors import PROJECTORS
    from dataflex.models.tiny import TINY_SIZES
    from dataflex.train import less_config

    assert set(less_config.AGGREGATIONS) == set(AGGREGATIONS)
    assert set(less_config.GRADIENT_TYPES) == set(GRADIENT_TYPES)
    assert set(less_config.PROJECTORS) == set(PROJECTORS)
    assert set(less_config.FEATURE_DTYPES) == set(FEATURE_DTYPES)
    assert set(DEMO_MODEL_SIZES) == set(TINY_SIZES)


def _is_schema_derived(value: ast.expr) -> bool:
    # `X().to_dict()` / `RunConfig().to_params()`: the only allowed way to spell a DEFAULTS dict.
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in ("to_dict", "to_params")
    )


def test_no_default_is_written_twice():
    """A module-level `DEFAULTS` in src/dataflex must be derived from the schema, never a dict literal."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            if node_value := getattr(node, "value", None):
                for target in targets:
                    if isinstance(target, ast.Name) and target.id == "DEFAULTS":
                        found.append(path.relative_to(SRC))
                        assert _is_schema_derived(node_value), (
                            f"{path.relative_to(ROOT)}:{node.lineno}: DEFAULTS must be derived from the schema "
                            "(e.g. LessConfig().to_dict()), not written by hand"
                        )
    assert len(found) >= 3  # dataflex.config, less_config, static_select_config
