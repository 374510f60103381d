"""Training arguments of the one loop (the HF / LLaMA-Factory names): the `train` parameter group, frozen and
checked once on construction (see dataflex.core.schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dataflex.core.errors import ConfigError
from dataflex.core.schema import Schema, setting

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "bf16", "fp16")
EVAL_STRATEGIES = ("no", "steps", "epoch")


def _max_steps(value: int) -> str | None:
    """-1 (train by epochs) or >= 1"""
    return None if value == -1 or value >= 1 else "a positive integer (or -1 to train by epochs)"


@dataclass(frozen=True)
class TrainingArguments(Schema):
    """The training loop's arguments (HF / LLaMA-Factory names), checked once on construction."""

    group: ClassVar[str] = "train"
    flat_prefix: ClassVar[str | None] = ""

    output_dir: str = setting("data/06_models/static", "where the run writes its model, checkpoints and summaries")
    per_device_train_batch_size: int = setting(8, "micro-batch size", ge=1)
    per_device_eval_batch_size: int = setting(16, "eval / generation batch size", ge=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = setting(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay; not applied to biases and norms (as the HF Trainer)", ge=0)
    adam_beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = setting(0.999, "AdamW beta2", ge=0, lt=1)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float | None = setting(1.0, "gradient clipping norm; 0 (or null) disables clipping", ge=0)
    lr_scheduler_type: str = setting(
        "linear",
        "learning-rate schedule",
        choices=SCHEDULERS,
        message="{name} {value!r} is not supported; valid: {allowed}",
    )
    warmup_ratio: float = setting(0.0, "LR warm-up as a share of the steps (warmup_steps wins when > 0)", ge=0, lt=1)
    warmup_steps: int = setting(0, "LR warm-up steps", ge=0)
    num_train_epochs: float = setting(1.0, "epochs over the pool (fractions allowed)", ge=0)
    max_steps: int = setting(-1, "optimizer steps; > 0 overrides num_train_epochs", check=_max_steps)
    seed: int = setting(42, "seed of the data order, dropout and LoRA init", ge=0)
    logging_steps: int = setting(10, "log (and record in MLflow) every N steps", ge=1)
    save_steps: int = setting(0, "TrainState checkpoint every N steps (and at the end); 0 = none", ge=0)
    save_total_limit: int | None = setting(None, "keep only the newest N checkpoints (null: all)", ge=1)
    resume_from_checkpoint: str | bool | None = setting(
        None, "a checkpoint-N dir, or latest / true (the newest under output_dir)"
    )
    overwrite_output_dir: bool = setting(
        False, "start a training run in an output_dir that holds a finished run (the old run is removed first)"
    )
    allow_different_base: bool = setting(
        False, "resume a checkpoint trained on another base model of the same shapes (refused by default)"
    )
    mixed_precision: str = setting(
        "no", "autocast for training (fp16 needs a GPU); flat YAML: bf16: true / fp16: true", choices=MIXED_PRECISION
    )
    # Evaluation during training (HF / LLaMA-Factory names) and early stopping on it (DataFlex's keys).
    eval_strategy: str = setting(
        "no",
        "evaluate the eval sets' loss during training: no, steps (every eval_steps), epoch",
        choices=EVAL_STRATEGIES,
        aliases=("evaluation_strategy",),
    )
    eval_steps: int | None = setting(None, "with eval_strategy: steps, every N steps (null: logging_steps)", ge=1)
    early_stopping_steps: int | None = setting(
        None, "stop when the eval loss has not improved for N evaluations (patience; null: never)", ge=1
    )
    early_stopping_min_delta: float = setting(0.0, "an improvement is a drop of more than this", ge=0)
    metric_for_best_model: str = setting(
        "eval_loss",
        "what the best checkpoint and early stopping follow: eval_loss (mean over the eval sets) or eval_<set>_loss",
    )
    greater_is_better: bool = setting(False, "whether a larger metric_for_best_model is better")
    load_best_model_at_end: bool = setting(
        False, "the saved model is the best evaluated checkpoint (output_dir/best), not the last step"
    )
    disable_shuffling: bool = setting(False, "keep the pool order")
    progress_bar: bool = setting(True, "show a tqdm progress bar")
    # Scale-out (dataflex.distributed): processes per training / feature node, an optional accelerate config file
    # (DDP, several nodes), and LLaMA-Factory's DeepSpeed JSON key (recognised; sharded states are refused for now).
    num_processes: int = setting(
        1, "processes per training / feature-extraction node (global batch = batch x accumulation x processes)", ge=1
    )
    accelerate_config: str | None = setting(
        None, "an accelerate config YAML for the workers (DDP, multi-node); its num_processes must match"
    )
    fsdp: str | None = setting(
        None,
        "FSDP2 sharding across the processes (HF's form): full_shard | shard_grad_op, optionally offload "
        "(e.g. 'full_shard auto_wrap'); needs num_processes >= 2",
    )
    fsdp_config: dict[str, Any] = setting(
        {}, "FSDP options: transformer_layer_cls_to_wrap (default: the model's decoder layer class)"
    )
    deepspeed: str | None = setting(
        None, "a DeepSpeed JSON (LLaMA-Factory's key): mapped onto FSDP2 (ZeRO-3 full_shard, ZeRO-2 shard_grad_op)"
    )

    def validate(self) -> None:
        """Checks across fields of this group (each field's own check ran on construction)."""
        if self.eval_strategy == "no" and (self.early_stopping_steps or self.load_best_model_at_end):
            raise ConfigError(
                "early_stopping_steps and load_best_model_at_end need evaluations during training: set "
                "eval_strategy: steps (with eval_steps) or epoch"
            )
        if not (
            self.metric_for_best_model == "eval_loss"
            or (self.metric_for_best_model.startswith("eval_") and self.metric_for_best_model.endswith("_loss"))
        ):
            raise ConfigError(
                f"metric_for_best_model {self.metric_for_best_model!r} is not computed during training; use "
                "eval_loss (the mean over the eval sets) or eval_<set>_loss"
            )
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(
                f"train.num_train_epochs must be > 0 (or set max_steps > 0), got {self.num_train_epochs!r}"
            )
        if self.fsdp and self.num_processes < 2:
            raise ConfigError(
                "train.fsdp shards the model across processes but num_processes is 1: set num_processes >= 2, or "
                "unset fsdp (one process trains unsharded)"
            )
        from dataflex.distributed.fsdp import parse_fsdp

        sharding = parse_fsdp(self.fsdp, self.fsdp_config)  # unknown options are one line here, before any work
        if sharding is not None and sharding.offload and self.mixed_precision == "fp16":
            raise ConfigError(
                "train.fsdp offload keeps gradients on the CPU, where fp16's loss scaler cannot unscale them; use "
                "bf16: true, or drop offload"
            )
        if self.fsdp and self.deepspeed:
            raise ConfigError("set either fsdp or deepspeed, not both (a DeepSpeed JSON is mapped onto FSDP2)")
        if self.accelerate_config and self.deepspeed:
            raise ConfigError(
                "set either accelerate_config or deepspeed, not both (a DeepSpeed JSON is mapped onto "
                "accelerate; put it in the accelerate config file instead)"
            )
