"""The one training loop (accelerate), shared by every mode.

Per optimizer step it takes the step's micro-batches from a data plan, counts the supervised tokens
of the whole accumulation window, and per micro-batch runs one forward pass that yields per-sample
losses (`MicroBatchLosses`). The loss to back-propagate comes from the run's `LossStrategy` (default: exactly
the HF Trainer's token mean over the window; a weighter's or DoReMi's replaces it), and every `Callback`
(selector, mixer, weighter) sees the same per-sample losses. Clipping, schedulers, mixed precision and DDP
gradient sync behave as in the HF Trainer.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_pt_utils import get_parameter_names

from dataflex.core.errors import ConfigError
from dataflex.distributed.fsdp import fsdp_settings, shard_model
from dataflex.train.trainer.args import TrainingArguments
from dataflex.train.trainer.callbacks import Callback, TrainContext
from dataflex.train.trainer.losses import (
    LossStrategy,
    MicroBatchLosses,
    StepInputs,
    TokenMeanLoss,
    WeighterError,
    count_supervised_tokens,
    forward_losses,
)
from dataflex.train.trainer.plan import DataPlan, EpochPlan, shard_step
from dataflex.train.trainer.state import (
    check_base,
    check_compatible,
    load_train_state,
    prune_checkpoints,
    read_manifest,
    resolve_resume_path,
    save_sharded_train_state,
    save_train_state,
)
from dataflex.utils.logging import logger

TRAIN_COLUMNS = ("input_ids", "labels", "sample_id", "domain_id")
__all__ = ["TrainContext", "TrainResult", "Trainer", "WeighterError", "make_accelerator", "make_optimizer"]


@dataclass
class TrainResult:
    global_step: int
    train_samples_seen: int
    train_tokens_seen: int
    final_train_loss: float | None
    train_loss_mean: float | None
    runtime_s: float
    log_history: list[dict[str, Any]]
    last_checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW with the HF Trainer's decay groups (no decay on biases and norms) and its default fused kernel."""
    decay = set(
        get_parameter_names(
            model, [torch.nn.LayerNorm], [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
        )
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters; check finetuning_type and lora_target")
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels are not available for every device/dtype
        return torch.optim.AdamW(groups, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, num_steps: int) -> Any:
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * num_steps)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps)


def scheduled_learning_rates(args: TrainingArguments, num_steps: int) -> list[float]:
    """The learning rate of each optimizer step of a run of `num_steps` (a replay of the schedule the Trainer
    builds), e.g. for LESS's per-epoch average learning rates."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    scheduler = make_scheduler(dummy, args, num_steps)
    lrs = []
    for _ in range(num_steps):
        lrs.append(float(scheduler.get_last_lr()[0]))
        dummy.step()
        scheduler.step()
    return lrs


def make_accelerator(args: TrainingArguments) -> Accelerator:
    mixed = args.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 mixed precision needs a GPU; training in fp32 on CPU instead (bf16 works on CPU)")
        mixed = "no"
    kwargs = {"mixed_precision": mixed, "cpu": not torch.cuda.is_available()}  # launched CPU workers: gloo
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # accelerate keeps one global state per process; a later run in the same process (notebook, tests,
        # the demo's pre-training then fine-tuning) may ask for another precision: start that state afresh.
        from accelerate.state import AcceleratorState

        if AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


class Trainer:
    """Train `model` on `train_dataset` (the data contract's columns) following `plan`.

    `callbacks` maps a name to a `Callback` (selector, mixer, weighter): each sees every micro-batch and step, and
    its state is part of every checkpoint under that name. `loss` is the run's `LossStrategy`. Built by
    `dataflex.train.run.Run`, the one place that assembles a run.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Any,
        args: TrainingArguments,
        *,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        plan: DataPlan | None = None,
        loss: LossStrategy | None = None,
        callbacks: Mapping[str, Callback] | None = None,
        metrics_sink: Callable[[dict[str, float], int], None] | None = None,
        accelerator: Accelerator | None = None,
        domain_names: list[str] | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        self.args = args
        self.accelerator = accelerator or make_accelerator(args)
        sharded = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if sharded in ("FSDP", "DEEPSPEED"):
            # The loop shards with FSDP2 itself (train.fsdp / deepspeed); accelerate's own sharding would wrap it twice.
            raise ConfigError(
                f"accelerate launched {sharded}: the loop shards with FSDP2 itself; set train.fsdp (or deepspeed) and "
                "launch plain data parallelism (distributed_type MULTI_GPU / MULTI_CPU)"
            )
        if self.accelerator.num_processes > 1 and self.accelerator.num_processes != args.num_processes:
            raise ConfigError(
                f"accelerate started {self.accelerator.num_processes} processes but num_processes is "
                f"{args.num_processes}; set num_processes to the launched world size"
            )
        self.train_dataset = train_dataset.select_columns([c for c in TRAIN_COLUMNS if c in train_dataset.column_names])
        self.data_collator = data_collator
        self.plan = plan or EpochPlan(
            len(train_dataset),
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps * args.num_processes,  # the plan is global (see plan.shard_step)
            seed=args.seed,
            num_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            shuffle=not args.disable_shuffling,
        )
        self.loss = loss or TokenMeanLoss()
        self.callbacks = dict(callbacks or {})
        self.metrics_sink = metrics_sink
        self.domain_names = domain_names or []
        self.model_fingerprint = model_fingerprint
        self.resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
        if args.resume_from_checkpoint not in (None, False) and self.resume_path is None:
            logger.info("resume_from_checkpoint: no checkpoint under %s yet, starting from scratch", args.output_dir)
        if self.resume_path is not None:
            # Refuse a truncated checkpoint or one from another model before any work.
            manifest = read_manifest(self.resume_path)
            check_compatible(manifest, model, self.resume_path)
            check_base(manifest, model_fingerprint, self.resume_path, allow=args.allow_different_base)
            saved = manifest.get("sharded_processes")
            if saved and saved != self.accelerator.num_processes and self.accelerator.is_main_process:
                logger.info(
                    "resuming %s, sharded over %d processes, on %d: its shards are redistributed (DCP)",
                    self.resume_path,
                    saved,
                    self.accelerator.num_processes,
                )
        # FSDP2 (train.fsdp, or a DeepSpeed JSON mapped onto it) shards the model itself, before the optimizer sees
        # its parameters; otherwise accelerate wraps it in DDP.
        self.fsdp = fsdp_settings(args) if self.accelerator.num_processes > 1 else None
        if self.fsdp is not None:
            model = shard_model(model, self.fsdp)
            if self.accelerator.is_main_process:
                for note in self.fsdp.notes:
                    logger.info("%s", note)
        self.optimizer = make_optimizer(model, args)
        self.scheduler = make_scheduler(self.optimizer, args, self.plan.num_steps)
        if self.fsdp is not None:
            self.model = model
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.global_step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.log_history: list[dict[str, Any]] = []
        self._loss_sum_all = 0.0
        self._interval = _Interval()
        self._restored = False

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint_dir(self, step: int | None = None) -> Path:
        return Path(self.args.output_dir) / "checkpoints" / f"checkpoint-{self.global_step if step is None else step}"

    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Save TrainState (main process only); other processes wait for it."""
        path = Path(path) if path else self.checkpoint_dir()
        if self.fsdp is not None:  # every rank writes its shards
            save_sharded_train_state(
                path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                trainer_state=self._trainer_state(),
                accelerator=self.accelerator,
            )
            if self.accelerator.is_main_process:
                prune_checkpoints(self.args.output_dir, self.args.save_total_limit)
            self.accelerator.wait_for_everyone()
            return path
        if self.accelerator.is_main_process:
            save_train_state(
                path,
                model=self.accelerator.unwrap_model(self.model),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                trainer_state=self._trainer_state(),
            )
            prune_checkpoints(self.args.output_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
        return path

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "max_steps": self.plan.num_steps,
            "epoch": self.plan.epoch_at(self.global_step),
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "loss_sum_all": self._loss_sum_all,
            "log_history": self.log_history,
            "log_interval": self._interval.state_dict(),
            "plan": self.plan.state_dict(),
            "components": {k: c.state_dict() for k, c in self.callbacks.items()},
            "model_fingerprint": self.model_fingerprint,
            "args": self.args.to_dict(),
        }

    def _restore(self, path: Path) -> None:
        state = load_train_state(
            path, model=self.accelerator.unwrap_model(self.model), optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.plan.load_state_dict(state["plan"])
        for name, comp in self.callbacks.items():
            if name in state.get("components", {}):
                comp.load_state_dict(state["components"][name])
        self.global_step = state["global_step"]
        self.samples_seen = state["samples_seen"]
        self.tokens_seen = state["tokens_seen"]
        self._loss_sum_all = state["loss_sum_all"]
        self.log_history = state["log_history"]
        self._interval.load_state_dict(state["log_interval"])
        logger.info("resumed from %s at step %d", path, self.global_step)

    # -- the loop ----------------------------------------------------------------------------------

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        columns = self.train_dataset[indices]
        rows = [{k: columns[k][i] for k in columns} for i in range(len(indices))]
        batch = self.data_collator(rows)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _window_tokens(self, batches: list[dict[str, torch.Tensor]]) -> int:
        local = sum(int(count_supervised_tokens(b["labels"]).sum()) for b in batches)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(torch.tensor([local], device=self.accelerator.device)).sum()
            return int(total)
        return local

    def restore(self) -> None:
        """Load the resume checkpoint now (once), e.g. to change a component or the mixture before training."""
        if self.resume_path is not None and not self._restored:
            self._restore(self.resume_path)
            self._restored = True

    def train(self, until_step: int | None = None) -> TrainResult:
        """Train to the plan's end, or stop after `until_step` (a segment of a longer run; the LR schedule and
        logging are those of the whole run, so segments chained through checkpoints equal one run)."""
        args, acc = self.args, self.accelerator
        if acc.num_processes != args.num_processes:
            raise ConfigError(
                f"num_processes is {args.num_processes} but this process is alone; run the training "
                "through dataflex.distributed.launch (the pipelines and dataflex-cli do)"
            )
        if self.resume_path is None and self.global_step == 0:
            set_seed(args.seed)  # once per run: a later segment of the same Trainer continues the RNG streams
        self.restore()
        max_steps = self.plan.num_steps
        stop = max_steps if until_step is None else min(until_step, max_steps)
        self.model.train()
        start = time.perf_counter()
        show = args.progress_bar and acc.is_local_main_process
        bar = tqdm(total=max_steps, initial=self.global_step, desc="train", unit="step", disable=not show)
        self._interval.start = time.perf_counter()
        last_checkpoint = None
        first = self.global_step
        while self.global_step < stop and not self.stopping():
            logs = self._optimizer_step(max_steps)
            if self.global_step == first + 1:
                self._notice_long_run(max_steps, time.perf_counter() - start)
            bar.update(1)
            if logs:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['learning_rate']:.2e}")
            end = self.global_step == max_steps or self.stopping()
            if args.save_steps and (self.global_step % args.save_steps == 0 or end):
                last_checkpoint = str(self.save_checkpoint())
        bar.close()
        return self.result(runtime_s=time.perf_counter() - start, last_checkpoint=last_checkpoint)

    def stopping(self) -> bool:
        """A callback ended the run early (early stopping); a resumed stopped run stays stopped."""
        return any(callback.should_stop() for callback in self.callbacks.values())

    def result(self, runtime_s: float = 0.0, last_checkpoint: str | None = None) -> TrainResult:
        """The run's result so far (after `train`, or of a restored checkpoint)."""
        return TrainResult(
            global_step=self.global_step,
            train_samples_seen=self.samples_seen,
            train_tokens_seen=self.tokens_seen,
            final_train_loss=self._final_train_loss(),
            train_loss_mean=self._loss_sum_all / self.global_step if self.global_step else None,
            runtime_s=runtime_s,
            log_history=self.log_history,
            last_checkpoint=last_checkpoint,
        )

    def _final_train_loss(self) -> float | None:
        """Mean loss of the run's last full `logging_steps` window, steps-weighted together with the shorter window
        after it when max_steps is not a multiple of logging_steps: at least logging_steps steps are averaged (a last
        window of 3 steps alone is noise), and the run's last steps still count."""
        windows: list[tuple[int, float]] = []  # (steps, mean loss) per log line, oldest first
        previous = 0
        for h in self.log_history:
            if "loss" in h:
                windows.append((max(int(h["step"]) - previous, 1), float(h["loss"])))
                previous = int(h["step"])
        steps = total = 0.0
        for n, loss in reversed(windows):
            steps, total = steps + n, total + n * loss
            if steps >= self.args.logging_steps:
                break
        return total / steps if steps else None

    def _notice_long_run(self, max_steps: int, step_seconds: float) -> None:
        """One line when the run is many passes over its data (e.g. a max_steps meant for a larger pool)."""
        passes = self.plan.epoch_at(max_steps)
        if passes > 10 and self.accelerator.is_main_process:
            left = step_seconds * (max_steps - self.global_step)
            eta = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
            logger.info(
                "max_steps=%d is %.0f passes over this pool; at %.2f s/step the run needs about %s more",
                max_steps,
                passes,
                step_seconds,
                eta,
            )

    def _optimizer_step(self, max_steps: int) -> dict[str, float]:
        """One optimizer step: accumulate, clip, step, log; returns the log line (empty between logging steps)."""
        args, acc = self.args, self.accelerator
        step_global = self.plan.step_batches(self.global_step)
        micro = shard_step(step_global, args.per_device_train_batch_size, acc.num_processes, acc.process_index)
        step_loss, weighted, n_micro = self._accumulate(micro or [step_global[0][:1]], max_steps, ghost=not micro)
        grad_norm = None
        if args.max_grad_norm and args.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self._loss_sum_all += float(step_loss)
        self.samples_seen += sum(len(ix) for ix in step_global)
        self._interval.add_step(float(step_loss), float(weighted), grad_norm, lr)
        logs: dict[str, float] = {}
        if self.global_step % args.logging_steps == 0 or self.global_step == max_steps:
            logs = self._log(self._interval)
            self._interval = _Interval()
        ctx = self._context(n_micro - 1, n_micro, max_steps)
        for callback in self.callbacks.values():
            callback.on_step_end(ctx, logs)
        return logs

    def _context(self, micro_step: int, num_micro: int, max_steps: int) -> TrainContext:
        epoch = self.plan.epoch_at(self.global_step)
        return TrainContext(
            self.global_step,
            max_steps,
            epoch,
            micro_step,
            num_micro,
            self.accelerator,
            self.args,
            self.domain_names,
            model=self.model,
            record=self.record,
            save_state=self.save_checkpoint,
        )

    def record(self, metrics: dict[str, float]) -> None:
        """Metrics of this step outside the log line (evaluations): into the history and the sink."""
        self.log_history.append({"step": self.global_step, **metrics})
        if self.metrics_sink is not None and self.accelerator.is_main_process:
            self.metrics_sink(metrics, self.global_step)

    def _accumulate(self, micro: list[list[int]], max_steps: int, ghost: bool = False) -> tuple[Any, Any, int]:
        """Forward and backward every micro-batch of one optimizer step; returns (standard loss, loss used, count).

        `ghost`: this process has no sample in a short last step; it runs one zero-weight pass on a sample of the
        step so that its gradient all-reduce (and every collective) still meets the other processes'."""
        acc, model = self.accelerator, self.model
        batches = [self._collate(ix) for ix in micro]
        window = self._window_tokens([] if ghost else batches)
        step_loss = torch.zeros((), device=acc.device)
        weighted = torch.zeros((), device=acc.device)
        n = len(batches)
        self.loss.start_step(
            StepInputs(
                acc,
                model,
                batches,
                ghost,
                self.global_step,
                self.args.gradient_accumulation_steps,
                lambda i: self._context(i, n, max_steps),
            )
        )
        for i, batch in enumerate(batches):
            ctx = self._context(i, n, max_steps)
            sync = i == n - 1 or acc.num_processes == 1
            with self._gradient_sync(sync), acc.autocast():
                losses = forward_losses(model, batch, window_tokens=window, num_processes=acc.num_processes)
                if ghost:
                    self.loss.ghost(losses)
                    acc.backward(losses.standard_loss() * 0.0)
                    break
                loss = self.loss.loss(losses, ctx, model, batch)
                acc.backward(loss)
            step_loss += losses.standard_loss().detach() / acc.num_processes
            weighted += loss.detach() / acc.num_processes
            self._interval.add_micro(losses, batch, self.domain_names)
            for callback in self.callbacks.values():
                callback.on_micro_batch(losses, ctx)
        if acc.num_processes > 1:  # each process holds its share of the step's loss: the step's is their sum
            both = acc.reduce(torch.stack([step_loss, weighted]), reduction="sum")
            step_loss, weighted = both[0], both[1]
        return step_loss, weighted, n

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Reduce gradients across processes on this micro-batch (the last of the step) or not."""
        if self.fsdp is not None:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def _log(self, interval: _Interval) -> dict[str, float]:
        tokens = interval.tokens
        if self.accelerator.num_processes > 1:
            tokens = int(self.accelerator.gather(torch.tensor([tokens], device=self.accelerator.device)).sum())
        self.tokens_seen += tokens
        elapsed = max(time.perf_counter() - interval.start, 1e-9)
        logs = {
            "loss": interval.loss_sum / interval.steps,
            "learning_rate": interval.lr,
            "epoch": round(self.plan.epoch_at(self.global_step), 4),
            "tokens_per_second": tokens / elapsed,
        }
        if interval.grad_norm is not None:
            logs["grad_norm"] = interval.grad_norm
        if abs(interval.weighted_sum - interval.loss_sum) > 1e-12:
            logs["weighted_loss"] = interval.weighted_sum / interval.steps
        domain = interval.domain
        if self.accelerator.num_processes > 1 and self.domain_names:  # per-domain sums of every process
            local = torch.tensor([domain.get(n, [0.0, 0]) for n in self.domain_names], dtype=torch.float64)
            summed = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").cpu().tolist()
            domain = {n: (t, c) for n, (t, c) in zip(self.domain_names, summed)}
        for name, (total, count) in domain.items():
            if count:
                logs[f"train_loss/{name}"] = total / count
        for callback in self.callbacks.values():
            logs.update(callback.metrics())
        self.log_history.append({"step": self.global_step, **logs})
        if self.metrics_sink is not None and self.accelerator.is_main_process:
            self.metrics_sink(logs, self.global_step)
        return logs


class _Interval:
    """Running sums between two log lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.loss_sum = 0.0
        self.weighted_sum = 0.0
        self.grad_norm: float | None = None
        self.lr = 0.0
        self.tokens = 0
        self.domain: dict[str, list[float]] = {}

    def add_micro(self, losses: MicroBatchLosses, batch: Mapping[str, torch.Tensor], names: list[str]) -> None:
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if losses.domain_id is None or not names:
            return
        sums = losses.token_loss_sum.detach().float()
        counts = losses.token_count
        for d in losses.domain_id.unique().tolist():
            sel = losses.domain_id == d
            entry = self.domain.setdefault(names[d] if d < len(names) else str(d), [0.0, 0])
            entry[0] += float(sums[sel].sum())
            entry[1] += int(counts[sel].sum())

    def state_dict(self) -> dict[str, Any]:
        # A resumed run logs the same numbers at the same steps as an uninterrupted one.
        return {k: v for k, v in self.__dict__.items() if k != "start"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_step(self, loss: float, weighted: float, grad_norm: Any, lr: float) -> None:
        self.steps += 1
        self.loss_sum += loss
        self.weighted_sum += weighted
        self.lr = lr
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)
