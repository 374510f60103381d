"""The parameter groups as frozen dataclasses, and `RunConfig` holding them all.

Group and key names are the grouped Kedro parameters' (`params["model"]["lora_rank"]` is
`RunConfig.model.lora_rank`); each key's default, constraints, flat name and doc live on its field only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dataflex.core.errors import ConfigError
from dataflex.core.schema import Schema, setting
from dataflex.train.compare_config import CompareConfig
from dataflex.train.dataset.mixed_proportion_manager import RULES as MIXTURE_SAMPLE_RULES
from dataflex.train.doremi_config import DoremiConfig
from dataflex.train.less_config import LessConfig
from dataflex.train.static_select_config import StaticSelectConfig
from dataflex.train.trainer.args import TrainingArguments

TRAIN_TYPES = ("static", "dynamic_select", "dynamic_mix", "dynamic_weight")
# Modes whose pipelines exist in this version; the others are recognised but refused with a clear line.
IMPLEMENTED_TRAIN_TYPES = ("static", "dynamic_select", "dynamic_mix", "dynamic_weight")
FINETUNING_TYPES = ("lora", "full")
STAGES = ("sft", "pt")
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "auto")
# dataflex.models.tiny.TINY_SIZES (not imported: it pulls in transformers); a test keeps the two equal.
DEMO_MODEL_SIZES = ("default", "test")

# Dataset names: a list, or one string "a,b,c" (what `key=value` overrides give).
Names = str | list[str]


@dataclass(frozen=True)
class ModelConfig(Schema):
    """The model to fine-tune and how (LoRA or full)."""

    group: ClassVar[str] = "model"
    flat_prefix: ClassVar[str | None] = ""

    model_name_or_path: str | None = setting(None, "local HF model dir, or a hub id when online (required)")
    finetuning_type: str = setting("lora", "LoRA adapters or full fine-tuning", choices=FINETUNING_TYPES)
    lora_target: str | list[str] = setting(
        "all", "all = every linear layer except the output head, or a comma list (q_proj,v_proj)"
    )
    lora_rank: int = setting(8, "LoRA rank", ge=1)
    lora_alpha: float | None = setting(None, "LoRA alpha (null: 2 x lora_rank)", gt=0)
    lora_dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    dtype: str = setting(
        "fp32", "weights dtype (fp16 falls back to fp32 on CPU)", choices=DTYPES, aliases=("infer_dtype",)
    )
    freeze_gate: bool = setting(
        False, "MoE models: router / gate weights stay frozen (full and LoRA fine-tuning); error without a gate"
    )
    train_from_scratch: bool = setting(
        False, "build the architecture from the model's config.json with a seeded random init (its weights unused)"
    )


@dataclass(frozen=True)
class DataConfig(Schema):
    """The datasets (LLaMA-Factory `dataset_info.json`), the template and tokenisation."""

    group: ClassVar[str] = "data"
    flat_prefix: ClassVar[str | None] = ""

    dataset: Names | None = setting(
        None, "names in dataset_info.json, a list or a,b,c; domain id = position (required)"
    )
    eval_dataset: Names | None = setting(None, "eval sets (one metric set each)")
    dataset_dir: str = setting("data", "folder with dataset_info.json (LLaMA-Factory format)")
    template: str = setting(
        "default", "chat template: a LLaMA-Factory name (default, llama3, qwen, mistral, ...: docs/data.md)"
    )
    cutoff_len: int = setting(
        1024,
        "max tokens per sample (sft: prompt and response share it, as in LLaMA-Factory)",
        ge=1,
        message="{name} must be an integer >= 1, got {value!r}",
    )
    stage: str = setting("sft", "sft (prompt masked) or pt (plain text, every token supervised)", choices=STAGES)
    train_on_prompt: bool = setting(False, "supervise the prompt tokens too")
    max_samples: int | None = setting(None, "at most this many rows per dataset (the first ones)", ge=1)
    val_size: int | float = setting(
        0.0, "hold out a fraction (< 1) or a count of the train pool as eval set `validation`", ge=0
    )
    packing: bool = setting(False, "pt only: concatenate texts per domain and cut into cutoff_len blocks")
    cache_dir: str = setting(
        "data/02_intermediate/cache", "tokenised datasets keyed by content (files, settings, tokenizer)"
    )


@dataclass(frozen=True)
class DynamicConfig(Schema):
    """The training mode, its component (selector / mixer / weighter) and its schedule."""

    group: ClassVar[str] = "dataflex"
    flat_prefix: ClassVar[str | None] = ""

    train_type: str = setting(
        "static",
        "static or a dynamic mode",
        choices=TRAIN_TYPES,
        message="unknown train_type {value!r}; valid: {allowed}",
    )
    component_name: str | None = setting(None, "the selector / mixer / weighter to use")
    components_cfg_file: str | None = setting(
        None, "DataFlex components YAML (selectors: / mixers: / weighters: -> name -> {name, params})"
    )
    components: dict[str, Any] = setting({}, "the same, inline in the parameters (wins key by key)")
    user_modules: str | list[str] = setting(
        [], "modules (dotted names or .py files) imported before building components"
    )
    warmup_step: int = setting(0, "dynamic modes: plain training steps before the component acts", ge=0)
    update_step: int = setting(0, "select / mix: steps between selector or mixer calls", ge=0)
    update_times: int = setting(1, "select / mix: calls per flex epoch (<= 0: as many as train_step allows)")
    train_step: int = setting(
        0, "dynamic modes: total optimizer steps, warmup included (0 = by epochs / max_steps)", ge=0
    )
    static_mix: bool = setting(
        False, "mix: no mixer, one segment at init_mixture_proportions for train_step (or epoch-derived) steps"
    )
    mixture_sample_rule: str = setting(
        "mixture",
        "mixture (proportions, changed by the mixer), stratified (by domain size), uniform (the last two are fixed)",
        choices=MIXTURE_SAMPLE_RULES,
    )
    init_mixture_proportions: list[float] | None = setting(
        None, "one value per dataset, >= 0, normalised (null: uniform)"
    )
    mixer_eval_dataset: Names | None = setting(None, "held-out per-domain sets for mixers that need them")


@dataclass(frozen=True)
class EvalConfig(Schema):
    """Evaluation on the eval sets: greedy generation settings."""

    group: ClassVar[str] = "eval"
    flat_prefix: ClassVar[str | None] = None  # only the LLaMA-Factory names below are flat keys

    generate: bool = setting(
        True, "exact-match accuracy of greedy generation on sft eval sets", flat="predict_with_generate"
    )
    max_new_tokens: int = setting(16, "generation length", ge=1, flat="max_new_tokens")
    max_generate_samples: int = setting(64, "generated samples per eval set", ge=0)


@dataclass(frozen=True)
class DemoConfig(Schema):
    """The demo corpus and tiny model, built on first use (Kedro parameters only)."""

    group: ClassVar[str] = "demo"
    flat_prefix: ClassVar[str | None] = None  # Kedro-only: `seed` would clash with train.seed

    build_if_missing: bool = setting(
        True, "build the demo corpus / tiny model when the config points at them and they are missing"
    )
    data_dir: str = setting("data/01_raw/demo", "where the demo corpus lives")
    model_dir: str = setting("data/01_raw/tiny_llama", "where the demo tiny model lives")
    proxy_model_dir: str = setting(
        "data/01_raw/tiny_llama_proxy", "the demo's small DoReMi proxy (a test-size tiny model), built on first use"
    )
    seed: int = setting(0, "seed of the demo corpus and tiny model", ge=0)
    model_size: str = setting("default", "tiny model size", choices=DEMO_MODEL_SIZES)
    pretrain_steps: int = setting(300, "pre-training steps of the tiny model", ge=0)


@dataclass(frozen=True)
class RunConfig:
    """Every parameter group of a run; `from_params` / `to_params` convert the grouped Kedro parameters."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainingArguments = dataclasses.field(default_factory=TrainingArguments)
    dataflex: DynamicConfig = dataclasses.field(default_factory=DynamicConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    demo: DemoConfig = dataclasses.field(default_factory=DemoConfig)
    less: LessConfig = dataclasses.field(default_factory=LessConfig)
    static_select: StaticSelectConfig = dataclasses.field(default_factory=StaticSelectConfig)
    doremi: DoremiConfig = dataclasses.field(default_factory=DoremiConfig)
    compare: CompareConfig = dataclasses.field(default_factory=CompareConfig)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunConfig:
        """Grouped Kedro parameters -> RunConfig; a missing (or null) group takes its defaults.

        Other top-level keys (Kedro runtime parameters such as `mlflow_uri`) are not groups and are left alone."""
        if not isinstance(params, Mapping):
            raise ConfigError(f"parameters must be a mapping of groups, got {type(params).__name__}")
        return cls(**{name: group.from_dict(params.get(name), name) for name, group in GROUPS.items()})

    def to_params(self) -> dict[str, dict[str, Any]]:
        """RunConfig -> grouped Kedro parameters (plain dicts, deep copies)."""
        return {name: getattr(self, name).to_dict() for name in GROUPS}


# Group name -> its class, in RunConfig's order (the docs and the flat-key table follow it).
GROUPS: dict[str, type[Schema]] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]
