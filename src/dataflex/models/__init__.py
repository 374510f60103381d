"""Models layer: tiny offline models, loading (LoRA / full), saving, merging and fingerprinting causal LMs."""

from dataflex.models.loader import (
    FINETUNING_TYPES,
    check_model_path,
    find_linear_target_modules,
    is_offline,
    load_model,
    load_tokenizer,
    load_trainable_state_dict,
    merge_and_export,
    model_fingerprint,
    resolve_dtype,
    save_trained,
    trainable_state_dict,
)
from dataflex.models.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, TINY_META_FILE, TINY_SIZES, init_tiny_model

__all__ = [
    "CHATML_TEMPLATE",
    "FINETUNING_TYPES",
    "SPECIAL_TOKENS",
    "TINY_META_FILE",
    "TINY_SIZES",
    "check_model_path",
    "find_linear_target_modules",
    "init_tiny_model",
    "is_offline",
    "load_model",
    "load_tokenizer",
    "load_trainable_state_dict",
    "merge_and_export",
    "model_fingerprint",
    "resolve_dtype",
    "save_trained",
    "trainable_state_dict",
]
