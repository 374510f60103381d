"""The run core: everything one training run (or one segment of it) needs, assembled in one place.

`Run(cfg, pool, mode)` builds tokenizer, collator, accelerator, the mode's components (selector / mixer /
weighter), its data plan and loss strategy, the model, the optimizer and the one `Trainer`, and resumes from a
TrainState when asked. `Run.finish()` saves the trained adapter / model and returns the `RunResult` whose
`to_summary()` is the one place the run's summary is built (the catalog's `train_result`). A mode
(`dataflex.train.modes`) says only what differs: its components, plan and loss, and what happens between segments.

`distributable` is the one launch decision: a library function decorated with it runs on `num_processes`
accelerate workers when the run asks for more than one (see `dataflex.distributed.launch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from dataflex.core.errors import ConfigError
from dataflex.data import DataCollatorForCausalLM, domain_names
from dataflex.distributed.fsdp import full_state_dict, is_sharded, read_sharded
from dataflex.distributed.launch import MetricsSink, distributable
from dataflex.models import load_model, load_tokenizer, model_fingerprint, save_trained
from dataflex.train.trainer import Callback, LossStrategy, Trainer, TrainingArguments, TrainResult, make_accelerator
from dataflex.train.trainer.evaluator import Evaluator
from dataflex.train.trainer.plan import DataPlan
from dataflex.train.trainer.state import check_compatible, read_manifest

if TYPE_CHECKING:
    from dataflex.config import ModelConfig, RunConfig

__all__ = [
    "Mode",
    "Run",
    "RunResult",
    "build_model",
    "distributable",
    "load_checkpoint_model",
    "train",
]


def build_model(model: ModelConfig, seed: int, adapter_path: str | None = None) -> torch.nn.Module:
    """The base model with LoRA (or trainable for full fine-tuning), from the model group of the config."""
    return load_model(
        model.model_name_or_path,
        finetuning_type=model.finetuning_type,
        lora_target=model.lora_target,
        lora_rank=model.lora_rank,
        lora_alpha=model.lora_alpha,
        lora_dropout=model.lora_dropout,
        dtype=model.dtype,
        adapter_path=adapter_path,
        seed=seed,
        freeze_gate=model.freeze_gate,
        from_scratch=model.train_from_scratch and adapter_path is None,
    )


def load_checkpoint_model(model: ModelConfig, checkpoint: str | Path, seed: int) -> torch.nn.Module:
    """The base model with a TrainState's trainable weights (e.g. the LESS warm-up adapter at one epoch)."""
    net = build_model(model, seed=seed)
    load_trainable(net, checkpoint)
    return net


def load_trainable(net: torch.nn.Module, checkpoint: str | Path) -> None:
    """A TrainState's trainable weights into `net` (checked to be the same model first)."""
    manifest = read_manifest(checkpoint)
    check_compatible(manifest, net, checkpoint)
    if manifest.get("sharded_processes"):  # an FSDP2 run's TrainState: DCP shards, reassembled here
        weights = read_sharded(Path(checkpoint), manifest["trainable"], "model")
    else:
        weights = load_file(str(Path(checkpoint) / "trainable.safetensors"))
    if is_sharded(net):  # an FSDP2 model: every rank hands the whole tensors over, each keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(net, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))


class Mode:
    """What a mode adds to the run core. Every hook has the static mode's answer; a mode overrides what differs."""

    name = "static"

    def __init__(self, cfg: RunConfig, pool_size: int) -> None:
        self.cfg, self.pool_size = cfg, pool_size

    def args(self) -> TrainingArguments:
        """The loop's arguments (e.g. a dynamic run's length from `train_step`)."""
        return self.cfg.train

    def components(self, run: Run) -> dict[str, Callback]:
        """Named callbacks (selector / mixer / weighter), built with `run.runtime()`."""
        return {}

    def plan(self, run: Run) -> DataPlan | None:
        """The data plan; None: epochs over the pool."""
        return None

    def loss(self, run: Run) -> LossStrategy | None:
        """The loss strategy; None: the HF Trainer's token mean."""
        return None

    def ready(self, run: Run) -> None:
        """Checks that need the built run (e.g. the plan's length), before any step."""


@dataclass
class RunResult:
    """A finished run: the loop's result and where its outputs are. `to_summary()` is the output contract."""

    mode: str
    cfg: RunConfig
    result: TrainResult
    domains: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "adapter" if self.cfg.model.finetuning_type == "lora" else "model"

    def to_summary(self) -> dict[str, Any]:
        from dataflex.train.modes import KIND_OF_TRAIN_TYPE, component_record

        out = Path(self.cfg.train.output_dir)
        flex = self.cfg.dataflex
        dynamic = self.mode in KIND_OF_TRAIN_TYPE and not (self.mode == "dynamic_mix" and flex.static_mix)
        return {
            "train_type": self.mode,
            "component_name": flex.component_name if self.mode.startswith("dynamic_") else None,
            "component": component_record(flex, KIND_OF_TRAIN_TYPE[self.mode]) if dynamic else None,
            "output_dir": str(out),
            "finetuning_type": self.cfg.model.finetuning_type,
            "model_name_or_path": self.cfg.model.model_name_or_path,
            f"{self.kind}_dir": str(out / self.kind),
            "domains": self.domains,
            **self.result.to_dict(),
            **self.extra,
        }


class Run:
    """One run (or one segment of a longer run, resumed from the previous segment's TrainState)."""

    def __init__(
        self,
        cfg: RunConfig,
        pool: Any,
        mode: Mode | None = None,
        *,
        eval_sets: Any = None,
        resume: str | None = None,
        metrics_sink: MetricsSink | None = None,
        evaluate: bool = True,
    ) -> None:
        self.cfg, self.pool, self.eval_sets = cfg, pool, eval_sets
        self.evaluate = evaluate  # False: the run only restores a model state (a mixture update), it does not train
        self.mode = mode or Mode(cfg, len(pool))
        args = self.mode.args()
        self.args = replace(args, resume_from_checkpoint=resume) if resume is not None else args
        self.tokenizer = load_tokenizer(cfg.model.model_name_or_path)
        self.collator = DataCollatorForCausalLM(self.tokenizer)
        self.accelerator = make_accelerator(self.args)
        self.base_id = model_fingerprint(cfg.model.model_name_or_path)
        self.domains = domain_names(pool)
        self.callbacks = self.mode.components(self)
        self.evaluator = self._evaluator()
        if self.evaluator is not None:
            self.callbacks = {**self.callbacks, "evaluator": self.evaluator}
        self.trainer = Trainer(
            build_model(cfg.model, seed=self.args.seed),
            pool,
            self.args,
            data_collator=self.collator,
            plan=self.mode.plan(self),
            loss=self.mode.loss(self),
            callbacks=self.callbacks,
            metrics_sink=metrics_sink,
            accelerator=self.accelerator,
            domain_names=self.domains,
            model_fingerprint=self.base_id,
        )
        self.mode.ready(self)
        self.trainer.restore()

    def _evaluator(self) -> Evaluator | None:
        """Evaluation during training (eval_strategy), on the run's eval sets."""
        if self.args.eval_strategy == "no" or not self.evaluate:
            return None
        if not self.eval_sets:
            raise ConfigError(f"eval_strategy: {self.args.eval_strategy} needs eval sets; set eval_dataset or val_size")
        return Evaluator(self.eval_sets, self.collator, self.args)

    def runtime(self, **extra: Any) -> dict[str, Any]:
        """The runtime objects components receive by constructor signature (the seed page's names)."""
        return {"dataset": self.pool, "accelerator": self.accelerator, "data_collator": self.collator, **extra}

    @property
    def model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.trainer.model)

    @property
    def global_step(self) -> int:
        return self.trainer.global_step

    def train(self, until_step: int | None = None) -> TrainResult:
        return self.trainer.train(until_step=until_step)

    def save_state(self, path: str | Path | None = None) -> Path:
        return self.trainer.save_checkpoint(path)

    def finish(self, result: TrainResult | None = None, **extra: Any) -> RunResult:
        """Save the trained adapter (LoRA) or model (full) under output_dir; the run's result."""
        if self.evaluator is not None:
            extra = {**self.evaluator.summary(), **extra}
            best = self.evaluator.best_checkpoint
            if self.args.load_best_model_at_end and best is not None:
                load_trainable(self.model, best)  # HF's load_best_model_at_end: the saved model is the best one
        finished = RunResult(self.mode.name, self.cfg, result or self.trainer.result(), self.domains, dict(extra))
        full = full_state_dict(self.model) if is_sharded(self.model) else None  # every process takes part
        if self.accelerator.is_main_process:
            save_trained(
                self.model,
                Path(self.args.output_dir) / finished.kind,
                tokenizer=self.tokenizer,
                state_dict=full,
                template=self.cfg.data.template,  # the saved tokenizer prompts as training did
            )
        self.accelerator.wait_for_everyone()
        return finished


@distributable
def train(
    cfg: RunConfig,
    pool: Any,
    mode: str = "static",
    eval_sets: Any = None,
    summary_extra: dict[str, Any] | None = None,
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """A one-segment run of `mode` (static, dynamic_weight) to its end; the run's summary (the catalog's
    `train_result`)."""
    from dataflex.train.modes import get_mode

    run = Run(cfg, pool, get_mode(mode)(cfg, len(pool)), eval_sets=eval_sets, metrics_sink=metrics_sink)
    return run.finish(run.train(), **(summary_extra or {})).to_summary()
