"""Static training (`train_type: static`): epochs over the pool with the one loop, then save the result."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dataflex.data import DataCollatorForCausalLM, domain_names
from dataflex.models import load_model, load_tokenizer, model_fingerprint, save_trained
from dataflex.train.trainer import Trainer, TrainingArguments
from dataflex.utils.io import atomic_write_json


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


def train_static(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    *,
    metrics_sink: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Train on `train_pool`; writes OUTPUT_DIR/adapter (LoRA) or OUTPUT_DIR/model (full) and train_result.json."""
    args = TrainingArguments.from_dict(dict(train_params))
    tokenizer = load_tokenizer(model_params["model_name_or_path"])
    model = build_model(model_params, seed=args.seed)
    trainer = Trainer(
        model,
        train_pool,
        args,
        data_collator=DataCollatorForCausalLM(tokenizer),
        metrics_sink=metrics_sink,
        domain_names=domain_names(train_pool),
        model_fingerprint=model_fingerprint(model_params["model_name_or_path"]),
    )
    result = trainer.train()
    out = Path(args.output_dir)
    kind = "adapter" if model_params["finetuning_type"] == "lora" else "model"
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.accelerator.is_main_process:
        save_trained(unwrapped, out / kind, tokenizer=tokenizer)
    summary = {
        "train_type": "static",
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
