"""Run one training job of any implemented `train_type` with the one loop, then save the result.

`static`: epochs over the pool. `dynamic_weight`: the same data, with a weighter (built from the registry)
replacing the loss from `warmup_step` on; `train_step` > 0 sets the total number of optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors.torch import load_file

from dataflex.core.components_cfg import component_spec, load_components_cfg
from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY, import_user_modules
from dataflex.data import DataCollatorForCausalLM, domain_names
from dataflex.distributed.launch import distributed, launch
from dataflex.models import load_model, load_tokenizer, model_fingerprint, save_trained
from dataflex.train.trainer import Trainer, TrainingArguments, make_accelerator
from dataflex.train.trainer.state import check_compatible, read_manifest
from dataflex.utils.io import atomic_write_json

KIND_OF_TRAIN_TYPE = {"dynamic_select": "selector", "dynamic_mix": "mixer", "dynamic_weight": "weighter"}


def build_model(model_params: Mapping[str, Any], seed: int, adapter_path: str | None = None) -> Any:
    return load_model(
        model_params["model_name_or_path"],
        finetuning_type=model_params["finetuning_type"],
        lora_target=model_params["lora_target"],
        lora_rank=model_params["lora_rank"],
        lora_alpha=model_params["lora_alpha"],
        lora_dropout=model_params["lora_dropout"],
        dtype=model_params["dtype"],
        adapter_path=adapter_path,
        seed=seed,
    )


def load_checkpoint_model(model_params: Mapping[str, Any], checkpoint: str | Path, seed: int) -> torch.nn.Module:
    """The base model with a TrainState's trainable weights (the warm-up adapter at that epoch)."""
    model = build_model(model_params, seed=seed)
    check_compatible(read_manifest(checkpoint), model, checkpoint)
    weights = load_file(str(Path(checkpoint) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model


def component_for(flex: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(kind, registered name, params) of the configured component; config errors before any model is loaded."""
    kind = KIND_OF_TRAIN_TYPE[flex["train_type"]]
    name = flex.get("component_name")
    if not name:
        raise ConfigError(f"train_type {flex['train_type']} needs component_name (a registered {kind})")
    import_user_modules(flex.get("user_modules"))
    cfg = load_components_cfg(flex.get("components_cfg_file"), flex.get("components"))
    registered, params = component_spec(cfg, kind, name)
    REGISTRY.check(kind, registered, params)
    return kind, registered, params


def total_steps(args: TrainingArguments, flex: Mapping[str, Any]) -> TrainingArguments:
    """DataFlex's `train_step` (> 0) is the exact number of optimizer steps of a dynamic run."""
    if flex.get("train_type") != "static" and flex.get("train_step", 0) > 0:
        args.max_steps = int(flex["train_step"])
    return args


def train_model(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex_params: Mapping[str, Any] | None = None,
    *,
    eval_sets: Mapping[str, Any] | None = None,
    metrics_sink: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Train on `train_pool`; writes OUTPUT_DIR/adapter (LoRA) or OUTPUT_DIR/model (full) and train_result.json.
    With num_processes > 1 the training runs on that many accelerate workers (dataflex.distributed)."""
    flex = dict(flex_params or {"train_type": "static"})
    if distributed(train_params):
        if flex.get("train_type") == "dynamic_weight":
            component_for(flex)  # config errors here, before the workers start
        return launch(
            "dataflex.train.runner:train_model",
            train_params,
            datasets={"train_pool": train_pool, "eval_sets": eval_sets},
            kwargs={"model_params": dict(model_params), "train_params": dict(train_params), "flex_params": flex},
            metrics_sink=metrics_sink,
        )
    train_type = flex.get("train_type", "static")
    args = total_steps(TrainingArguments.from_dict(dict(train_params)), flex)
    tokenizer = load_tokenizer(model_params["model_name_or_path"])
    collator = DataCollatorForCausalLM(tokenizer)
    accelerator = make_accelerator(args)
    weighter, component = None, None
    if train_type == "dynamic_weight":
        _, component, params = component_for(flex)
        anchors = datasets.concatenate_datasets(list(eval_sets.values())) if eval_sets else None
        runtime = {
            "dataset": train_pool,
            "eval_dataset": anchors,
            "accelerator": accelerator,
            "data_collator": collator,
        }
        weighter = REGISTRY.build("weighter", component, runtime=runtime, cfg=params)
    elif train_type != "static":
        raise ConfigError(f"train_type '{train_type}' is not available in this version yet")
    model = build_model(model_params, seed=args.seed)
    trainer = Trainer(
        model,
        train_pool,
        args,
        data_collator=collator,
        metrics_sink=metrics_sink,
        domain_names=domain_names(train_pool),
        model_fingerprint=model_fingerprint(model_params["model_name_or_path"]),
        accelerator=accelerator,
        weighter=weighter,
        weighter_name=component or "weighter",
        weighting_warmup_steps=int(flex.get("warmup_step") or 0),
    )
    if weighter is not None and flex.get("warmup_step", 0) > trainer.plan.num_steps:
        steps = trainer.plan.num_steps
        raise ConfigError(
            f"warmup_step ({flex['warmup_step']}) is larger than the run's {steps} optimizer steps: "
            "the weighter would never start; lower warmup_step or train longer"
        )
    result = trainer.train()
    out = Path(args.output_dir)
    kind = "adapter" if model_params["finetuning_type"] == "lora" else "model"
    if trainer.accelerator.is_main_process:
        save_trained(trainer.accelerator.unwrap_model(trainer.model), out / kind, tokenizer=tokenizer)
    summary = {
        "train_type": train_type,
        "component_name": flex.get("component_name") if train_type != "static" else None,
        "output_dir": str(out),
        "finetuning_type": model_params["finetuning_type"],
        "model_name_or_path": model_params["model_name_or_path"],
        f"{kind}_dir": str(out / kind),
        "domains": domain_names(train_pool),
        **result.to_dict(),
    }
    if trainer.accelerator.is_main_process:
        atomic_write_json(out / "train_result.json", summary)
    return summary
