"""Flat DataFlex / LLaMA-Factory YAML <-> grouped parameters: loading, `key=value` overrides, the flat-key table
(generated from the schema), and path resolution."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dataflex.config.groups import GROUPS, RunConfig
from dataflex.core.errors import ConfigError
from dataflex.core.schema import did_you_mean, flat_names
from dataflex.utils.io import read_user_text
from dataflex.utils.logging import logger


def _flat_keys() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for group, cls in GROUPS.items():
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            for flat in flat_names(cls, field.name):
                if flat in out:  # a programming error: two keys would claim the same flat name
                    raise RuntimeError(f"flat key {flat!r} names both {'.'.join(out[flat])} and {group}.{field.name}")
                out[flat] = (group, field.name)
    return out


# Flat (DataFlex / LLaMA-Factory) key -> (group, grouped key), from each field's flat name and aliases.
FLAT_KEYS: dict[str, tuple[str, str]] = _flat_keys()
# Flat keys that set a grouped key through a conversion (`bf16: true` -> train.mixed_precision: bf16).
CONVERTED_KEYS: dict[str, tuple[str, str]] = {
    "bf16": ("train", "mixed_precision"),
    "fp16": ("train", "mixed_precision"),
}
_CONVERTED = set(CONVERTED_KEYS)

# Known keys that change nothing here (logging, hub, workers, memory tricks): accepted with a one-line notice.
IGNORED_KEYS = frozenset(
    {
        "ddp_timeout",
        "plot_loss",
        "report_to",
        "overwrite_cache",
        "preprocessing_num_workers",
        "dataloader_num_workers",
        "do_train",
        "do_eval",
        "do_predict",
        "trust_remote_code",
        "save_only_model",
        "logging_dir",
        "run_name",
        "flash_attn",
        "disable_version_check",
        "ddp_find_unused_parameters",
        "save_strategy",
        "include_num_input_tokens_seen",
        "gradient_checkpointing",
        "enable_liger_kernel",
        "dataloader_pin_memory",
        "bf16_full_eval",
        "save_safetensors",
    }
)
# Known keys whose meaning this version does not implement: silently dropping them would change the run.
UNSUPPORTED_KEYS = frozenset(
    {
        "quantization_bit",
        "use_unsloth",
        "streaming",
        "buffer_size",
        "neat_packing",
        "mix_strategy",
        "interleave_probs",
        "tokenized_path",
        "upcast_layernorm",
        "resize_vocab",
        "optim",
    }
)
# `optim` values that are what the loop does anyway: accepted with the ignored keys' notice.
SAME_OPTIMIZER = ("adamw_torch", "adamw_torch_fused")

# YAML 1.1 reads `5e-5` (no dot) as a string; LLaMA-Factory's argument parser turns it into a float, so do we.
_SCI_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def default_params() -> dict[str, dict[str, Any]]:
    """The library defaults as grouped parameters (fresh dicts)."""
    return RunConfig().to_params()


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(read_user_text(path, "config file", ConfigError))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if loaded is None:
        raise ConfigError(f"config file '{path}' is empty")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of keys to values, got {type(loaded).__name__}")
    return _numbers(loaded)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` command-line overrides; values are parsed as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = _numbers(yaml.safe_load(raw)) if raw != "" else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def flat_to_grouped(flat: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Map a flat DataFlex YAML onto grouped parameters (on top of `base`, default: library defaults)."""
    params = copy.deepcopy(dict(base)) if base is not None else default_params()
    unsupported = sorted(k for k in flat if k in UNSUPPORTED_KEYS and not (k == "optim" and flat[k] in SAME_OPTIMIZER))
    if unsupported:
        raise ConfigError(
            f"config key(s) {', '.join(unsupported)} are not supported by this version of dataflex; "
            "remove them (see docs/config.md)"
        )
    known = FLAT_KEYS.keys() | IGNORED_KEYS | UNSUPPORTED_KEYS | _CONVERTED
    unknown = sorted(k for k in flat if k not in known)
    if unknown:
        listed = ", ".join(f"{k}{did_you_mean(k, sorted(known))}" for k in unknown)
        raise ConfigError(
            f"unknown config key(s): {listed} (see docs/config.md for the supported DataFlex / LLaMA-Factory keys)"
        )
    ignored = sorted(k for k in flat if k in IGNORED_KEYS or k == "optim")
    if ignored:
        logger.info("accepted but not used by dataflex: %s", ", ".join(ignored))
    for key, value in flat.items():
        if key in IGNORED_KEYS or key == "optim":
            continue
        if key in CONVERTED_KEYS:
            if value:
                group, name = CONVERTED_KEYS[key]
                params[group][name] = key
            continue
        group, name = FLAT_KEYS[key]
        params[group][name] = value
    return params


def resolve_paths(params: dict[str, Any], base_dir: str | Path, search: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Make the path-valued settings absolute. Outputs (output_dir, caches) are relative to `base_dir`, the user's
    working directory. Inputs (dataset_dir, components and accelerate files, the model, ...) are looked up in
    `base_dir`, then each of `search` (the YAML's own folder, the project root) in that order: the first place
    where the path exists wins, so a DataFlex YAML run from elsewhere still finds `data/` or
    `src/dataflex/configs/components.yaml` next to it. A path found nowhere stays relative to `base_dir` (its error
    then names that path)."""
    base_dir = Path(base_dir)
    places = [base_dir, *(Path(p) for p in search)]

    def absolute(value: Any) -> Any:
        if not value or not isinstance(value, str):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())

    def find(value: Any) -> Any:
        if not value or not isinstance(value, str) or Path(value).expanduser().is_absolute():
            return absolute(value)
        for place in places:
            if (place / value).exists():
                return str((place / value).resolve())
        return absolute(value)

    data, model, train, flex = params["data"], params["model"], params["train"], params["dataflex"]
    data["dataset_dir"] = find(data["dataset_dir"])
    data["cache_dir"] = absolute(data["cache_dir"])
    train["output_dir"] = absolute(train["output_dir"])
    for key in ("accelerate_config", "deepspeed"):
        train[key] = find(train.get(key))
    flex["components_cfg_file"] = find(flex["components_cfg_file"])
    for group, keys in (("less", ("datastore_dir", "warmup_dir")), ("static_select", ("warmup_dir", "cache_dir"))):
        values = params.get(group) or {}
        for key in keys:
            if key in values:
                values[key] = absolute(values[key])
    # A model path is resolved only when it exists locally: otherwise it may be a hub id.
    for key in ("model_name_or_path", "adapter_name_or_path"):
        name = model.get(key)
        if isinstance(name, str) and not Path(name).is_absolute() and any((p / name).exists() for p in places):
            model[key] = find(name)
    resume = train.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume.lower() not in ("true", "false", "latest"):
        train["resume_from_checkpoint"] = find(resume)
    modules = flex.get("user_modules") or []
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    flex["user_modules"] = [find(m) if m.endswith(".py") else m for m in modules]
    return params
