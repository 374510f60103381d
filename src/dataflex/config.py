"""Typed, validated configuration: grouped Kedro parameters <-> DataFlex / LLaMA-Factory flat YAML keys.

Kedro parameters are grouped (`model`, `data`, `train`, `dataflex`, `eval`, `demo`); a DataFlex YAML is
flat. `FLAT_KEYS` is the one mapping between them (the README's table is generated from the same
names). Keys DataFlex / LLaMA-Factory know but this project does not use are accepted with a notice
(`IGNORED_KEYS`); any other key is an error.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dataflex.core.errors import ConfigError
from dataflex.train.less_config import DEFAULTS as LESS_DEFAULTS
from dataflex.train.static_select_config import DEFAULTS as STATIC_SELECT_DEFAULTS
from dataflex.train.trainer.args import TrainingArguments
from dataflex.utils.logging import logger

TRAIN_TYPES = ("static", "dynamic_select", "dynamic_mix", "dynamic_weight")
# Modes whose pipelines exist in this version; the others are recognised but refused with a clear line.
IMPLEMENTED_TRAIN_TYPES = ("static", "dynamic_select", "dynamic_mix", "dynamic_weight")
FINETUNING_TYPES = ("lora", "full")
STAGES = ("sft", "pt")
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "auto")

# Library defaults (LLaMA-Factory's where it has one). Kedro's parameters.yml sets the demo on top.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "model_name_or_path": None,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "lora_alpha": None,  # None: 2 x lora_rank
        "lora_dropout": 0.0,
        "dtype": "fp32",
    },
    "data": {
        "dataset": None,
        "eval_dataset": None,
        "dataset_dir": "data",
        "template": "default",
        "cutoff_len": 1024,
        "stage": "sft",
        "train_on_prompt": False,
        "max_samples": None,
        "val_size": 0.0,
        "packing": False,
        "cache_dir": "data/02_intermediate/cache",
    },
    "train": TrainingArguments().to_dict(),
    "dataflex": {
        "train_type": "static",
        "component_name": None,
        "components_cfg_file": None,
        "components": {},
        "user_modules": [],
        "warmup_step": 0,
        "update_step": 0,
        "update_times": 1,
        "train_step": 0,
        "static_mix": False,
        "mixture_sample_rule": "mixture",
        "init_mixture_proportions": None,
        "mixer_eval_dataset": None,
    },
    "eval": {
        "generate": True,
        "max_new_tokens": 16,
        "max_generate_samples": 64,
    },
    "less": dict(LESS_DEFAULTS),
    "static_select": dict(STATIC_SELECT_DEFAULTS),
    "demo": {
        "build_if_missing": True,
        "data_dir": "data/01_raw/demo",
        "model_dir": "data/01_raw/tiny_llama",
        "seed": 0,
        "model_size": "default",
        "pretrain_steps": 300,
    },
}

# Flat (DataFlex / LLaMA-Factory) key -> (group, grouped key).
FLAT_KEYS: dict[str, tuple[str, str]] = {}
for _group in ("model", "data", "train", "dataflex"):
    for _key in DEFAULTS[_group]:
        FLAT_KEYS[_key] = (_group, _key)
# LESS settings in a flat YAML carry a `less_` prefix (`less_targets`, `less_percentage`, ...).
FLAT_KEYS.update({f"less_{k}": ("less", k) for k in DEFAULTS["less"]})
# One-shot selection (`--pipeline static_select`) likewise: `static_select_selector`, `static_select_targets`, ...
FLAT_KEYS.update({f"static_select_{k}": ("static_select", k) for k in DEFAULTS["static_select"]})
FLAT_KEYS.update(
    {
        "max_new_tokens": ("eval", "max_new_tokens"),
        "predict_with_generate": ("eval", "generate"),
        "infer_dtype": ("model", "dtype"),
    }
)
# Flat keys that set a grouped key through a conversion.
_CONVERTED = {"bf16", "fp16"}

# Known keys that change nothing here (logging, hub, workers, memory tricks): accepted with a one-line notice.
IGNORED_KEYS = frozenset(
    {
        "ddp_timeout",
        "plot_loss",
        "report_to",
        "overwrite_cache",
        "overwrite_output_dir",
        "preprocessing_num_workers",
        "dataloader_num_workers",
        "do_train",
        "do_eval",
        "do_predict",
        "trust_remote_code",
        "save_only_model",
        "eval_strategy",
        "evaluation_strategy",
        "eval_steps",
        "metric_for_best_model",
        "greater_is_better",
        "load_best_model_at_end",
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
        "early_stopping_steps",
        "early_stopping_min_delta",
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
        "freeze_gate",
        "resize_vocab",
        "optim",
    }
)
_SAME_OPTIMIZER = ("adamw_torch", "adamw_torch_fused")


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
    return copy.deepcopy(DEFAULTS)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
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
    unsupported = sorted(k for k in flat if k in UNSUPPORTED_KEYS and not (k == "optim" and flat[k] in _SAME_OPTIMIZER))
    if unsupported:
        raise ConfigError(
            f"config key(s) {', '.join(unsupported)} are not supported by this version of dataflex; "
            "remove them (see the README's key table)"
        )
    known = FLAT_KEYS.keys() | IGNORED_KEYS | UNSUPPORTED_KEYS | _CONVERTED
    unknown = [k for k in flat if k not in known]
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(sorted(unknown))} "
            "(see the README's key table for the supported DataFlex / LLaMA-Factory keys)"
        )
    ignored = sorted(k for k in flat if k in IGNORED_KEYS or k == "optim")
    if ignored:
        logger.info("accepted but not used by dataflex: %s", ", ".join(ignored))
    for key, value in flat.items():
        if key in IGNORED_KEYS or key == "optim":
            continue
        if key in ("bf16", "fp16"):
            if value:
                params["train"]["mixed_precision"] = key
            continue
        group, name = FLAT_KEYS[key]
        params[group][name] = value
    return params


def resolve_paths(params: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """Make the path-valued settings absolute against `base_dir` (the YAML user's working directory)."""
    base_dir = Path(base_dir)

    def absolute(value: Any) -> Any:
        if not value or not isinstance(value, str):
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base_dir / path).resolve())

    data, model, train, flex = params["data"], params["model"], params["train"], params["dataflex"]
    data["dataset_dir"] = absolute(data["dataset_dir"])
    data["cache_dir"] = absolute(data["cache_dir"])
    train["output_dir"] = absolute(train["output_dir"])
    for key in ("accelerate_config", "deepspeed"):
        train[key] = absolute(train.get(key))
    flex["components_cfg_file"] = absolute(flex["components_cfg_file"])
    less = params.get("less") or {}
    for key in ("datastore_dir", "warmup_dir", "output_dir"):
        if key in less:
            less[key] = absolute(less[key])
    # A model path is resolved only when it exists locally: otherwise it may be a hub id.
    name = model["model_name_or_path"]
    if isinstance(name, str) and (base_dir / name).exists() and not Path(name).is_absolute():
        model["model_name_or_path"] = absolute(name)
    resume = train.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume.lower() not in ("true", "false", "latest"):
        train["resume_from_checkpoint"] = absolute(resume)
    modules = flex.get("user_modules") or []
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    flex["user_modules"] = [absolute(m) if m.endswith(".py") else m for m in modules]
    return params


def validate_params(params: Mapping[str, Any], *, check_paths: bool = True) -> None:
    """Every check that needs no heavy work: one ConfigError line for the first problem found."""
    for group in ("model", "data", "train", "dataflex", "less", "static_select"):
        if group in ("less", "static_select") and group not in params:
            continue
        if group not in params or not isinstance(params[group], Mapping):
            raise ConfigError(f"parameters need a '{group}' section")
        unknown = sorted(set(params[group]) - set(DEFAULTS[group]))
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                f"valid: {', '.join(sorted(DEFAULTS[group]))}"
            )
    model, data, flex = params["model"], params["data"], params["dataflex"]
    TrainingArguments.from_dict(dict(params["train"]))

    train_type = flex.get("train_type")
    if train_type not in TRAIN_TYPES:
        raise ConfigError(f"unknown train_type '{train_type}'; valid: {', '.join(TRAIN_TYPES)}")
    if train_type not in IMPLEMENTED_TRAIN_TYPES:
        raise ConfigError(
            f"train_type '{train_type}' is recognised but not available in this version yet; "
            f"available: {', '.join(IMPLEMENTED_TRAIN_TYPES)}"
        )

    if not model.get("model_name_or_path"):
        raise ConfigError("model_name_or_path is missing; set it to a local model directory or a hub id")
    if model.get("finetuning_type") not in FINETUNING_TYPES:
        raise ConfigError(
            f"finetuning_type '{model.get('finetuning_type')}' is not valid; use {' or '.join(FINETUNING_TYPES)}"
        )
    _positive_int(model, "lora_rank")
    if model.get("lora_alpha") is not None and not (_number(model["lora_alpha"]) and model["lora_alpha"] > 0):
        raise ConfigError(f"lora_alpha must be > 0, got {model['lora_alpha']!r}")
    if not (_number(model.get("lora_dropout")) and 0 <= model["lora_dropout"] < 1):
        raise ConfigError(f"lora_dropout must be in [0, 1), got {model.get('lora_dropout')!r}")
    if model.get("dtype") not in DTYPES:
        raise ConfigError(f"dtype '{model.get('dtype')}' is not valid; use one of {', '.join(DTYPES)}")

    if not data.get("dataset"):
        raise ConfigError("dataset is missing; name one or more datasets of dataset_info.json (list or 'a,b,c')")
    if data.get("stage") not in STAGES:
        raise ConfigError(f"stage '{data.get('stage')}' is not valid; use {' or '.join(STAGES)}")
    cutoff = data.get("cutoff_len")
    if not isinstance(cutoff, int) or isinstance(cutoff, bool) or cutoff < 1:
        raise ConfigError(f"cutoff_len must be an integer >= 1, got {cutoff!r}")
    if data.get("max_samples") is not None:
        _positive_int(data, "max_samples")
    val = data.get("val_size") or 0
    if not _number(val) or val < 0:
        raise ConfigError(f"val_size must be >= 0 (a fraction below 1 or a count), got {val!r}")

    from dataflex.data.templates import get_template

    get_template(data.get("template"))
    if check_paths:
        _check_paths(params)
        from dataflex.distributed.launch import check_launch_config

        check_launch_config(params["train"])
    if train_type != "static":
        _check_dynamic(params)


def _check_dynamic(params: Mapping[str, Any]) -> None:
    """Component name and params, and the schedule, of a dynamic mode (before any model is loaded)."""
    from dataflex.train.runner import component_for

    flex, data = params["dataflex"], params["data"]
    for key in ("warmup_step", "update_step", "train_step"):
        value = flex.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
    if flex["train_type"] == "dynamic_mix":
        from dataflex.data.dataset_info import parse_dataset_names
        from dataflex.train.dataset.mixed_proportion_manager import check_proportions
        from dataflex.train.mix import check_mix_config

        k = len(parse_dataset_names(data["dataset"]))
        check_mix_config(flex, num_domains=k)
        if flex.get("init_mixture_proportions") is not None:
            check_proportions(flex["init_mixture_proportions"], k, "init_mixture_proportions")
        if flex.get("static_mix"):
            return
        for key in ("warmup_step", "update_step"):
            if flex[key] < 1:
                raise ConfigError(f"dynamic_mix needs {key} >= 1, got {flex[key]}")
    kind, name, _ = component_for(flex)
    if flex["train_type"] == "dynamic_select":
        from dataflex.train.select import check_select_config

        if flex.get("update_times", 1) <= 0 and flex["train_step"] <= 0:
            raise ConfigError(
                "dynamic_select with update_times <= 0 needs train_step > 0 (the rounds are unrolled "
                "before the data is read); or set update_times >= 1"
            )
        check_select_config(flex, params["train"], bool(data.get("eval_dataset") or data.get("val_size")))
    if flex["train_step"] and flex["warmup_step"] > flex["train_step"]:
        raise ConfigError(
            f"warmup_step ({flex['warmup_step']}) > train_step ({flex['train_step']}): the {kind} "
            "would never start; lower warmup_step or raise train_step"
        )
    if name == "adapt" and not (data.get("eval_dataset") or data.get("val_size")):
        raise ConfigError("weighter 'adapt' needs an eval_dataset (its anchor set); set eval_dataset or val_size")


def _check_paths(params: Mapping[str, Any]) -> None:
    from dataflex.data.pools import check_sources
    from dataflex.models.loader import check_model_path

    model, data, demo = params["model"], params["data"], params.get("demo") or {}
    will_build = demo.get("build_if_missing", False)
    demo_model = _same_path(model["model_name_or_path"], demo.get("model_dir"))
    demo_data = _same_path(data["dataset_dir"], demo.get("data_dir"))
    if not (will_build and demo_model and not Path(model["model_name_or_path"]).exists()):
        check_model_path(model["model_name_or_path"])
    if not (will_build and demo_data and not (Path(data["dataset_dir"]) / "dataset_info.json").exists()):
        check_sources(data)
    from dataflex.train.trainer.state import read_manifest, resolve_resume_path

    train = params["train"]
    resume = resolve_resume_path(train.get("resume_from_checkpoint"), train["output_dir"])
    if resume is not None:
        read_manifest(resume)
    flex = params["dataflex"]
    if flex.get("components_cfg_file") and not Path(flex["components_cfg_file"]).is_file():
        raise ConfigError(f"components_cfg_file '{flex['components_cfg_file']}' does not exist")


def _same_path(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    return Path(a).resolve() == Path(b).resolve()


def _positive_int(group: Mapping[str, Any], key: str) -> None:
    value = group.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
