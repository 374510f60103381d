"""Training arguments of the one loop (the HF / LLaMA-Factory names, validated once)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dataflex.core.errors import ConfigError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainingArguments:
    output_dir: str = "data/06_models/static"
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = None
    resume_from_checkpoint: str | bool | None = None
    mixed_precision: str = "no"
    disable_shuffling: bool = False
    progress_bar: bool = True
    # Scale-out (dataflex.distributed): processes per training / feature node, an optional accelerate config file
    # (DDP, several nodes), and LLaMA-Factory's DeepSpeed JSON key (recognised; sharded states are refused for now).
    num_processes: int = 1
    accelerate_config: str | None = None
    deepspeed: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> TrainingArguments:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"unknown training parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "num_processes",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not _is_number(self.num_train_epochs) or (self.num_train_epochs <= 0 and self.max_steps <= 0):
            raise ConfigError(f"num_train_epochs must be > 0 (or set max_steps > 0), got {self.num_train_epochs!r}")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"max_steps must be a positive integer (or -1 to train by epochs), got {self.max_steps!r}"
            )
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ConfigError(
                f"lr_scheduler_type '{self.lr_scheduler_type}' is not supported; valid: {', '.join(SCHEDULERS)}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_steps < 0 or self.save_steps < 0:
            raise ConfigError("warmup_steps and save_steps must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision '{self.mixed_precision}' is not valid; use one of {', '.join(MIXED_PRECISION)}"
            )
        if self.accelerate_config and self.deepspeed:
            raise ConfigError(
                "set either accelerate_config or deepspeed, not both (a DeepSpeed JSON is mapped onto "
                "accelerate; put it in the accelerate config file instead)"
            )
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1 or null, got {self.save_total_limit!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
