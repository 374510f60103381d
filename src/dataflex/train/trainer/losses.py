"""Per-sample losses, computed once per micro-batch (fp32), and the loss strategies of the loop.

`LossStrategy` decides what the loop back-propagates for each micro-batch. `TokenMeanLoss` is the default and
equals the HF Trainer's for causal LMs: summed token cross-entropy divided by the number of supervised tokens in
the whole accumulation window (all micro-batches, all processes). `WeightedLoss` hands the loss to a weighter
from `warmup_step` on, with the step-wide scores it needs (pre-pass, gather across processes, offsets). DoReMi's
proxy loss is the third strategy (in its mixer's module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dataflex.core.errors import DataFlexError
from dataflex.distributed.collectives import gather_varlen
from dataflex.features.token_losses import IGNORE_INDEX, count_supervised_tokens, per_token_losses
from dataflex.train.trainer.callbacks import TrainContext

if TYPE_CHECKING:
    from dataflex.compat import TrainerState

__all__ = [
    "IGNORE_INDEX",
    "LossStrategy",
    "MicroBatchLosses",
    "StepInputs",
    "TokenMeanLoss",
    "WeightedLoss",
    "WeighterError",
    "WeightingContext",
    "count_supervised_tokens",
    "forward_losses",
    "per_token_losses",
]


class WeighterError(DataFlexError):
    """A weighter produced an unusable loss (non-scalar, NaN, negative)."""


@dataclass
class MicroBatchLosses:
    """What one micro-batch's forward pass yields, shared by the loss, weighters and observers."""

    token_loss_sum: torch.Tensor  # [B] fp32, summed CE over each row's supervised tokens (with graph)
    token_count: torch.Tensor  # [B] int64, supervised tokens per row
    window_tokens: int  # supervised tokens in the whole accumulation window, all processes
    num_processes: int = 1
    sample_id: torch.Tensor | None = None
    domain_id: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None  # [B, L-1] fp32 per-token CE (0 where ignored), with graph
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_sample_loss(self) -> torch.Tensor:
        """Token-mean loss of each row (0 for a fully masked row), with graph."""
        return self.token_loss_sum / self.token_count.clamp(min=1).to(self.token_loss_sum.dtype)

    def standard_loss(self) -> torch.Tensor:
        """The HF Trainer's loss contribution of this micro-batch.

        Multiplied by the number of processes because DDP averages gradients across ranks while the
        window token count is global (HF does the same with average_tokens_across_devices).
        """
        return self.token_loss_sum.sum() * self.num_processes / max(self.window_tokens, 1)


def forward_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, window_tokens: int, num_processes: int = 1
) -> MicroBatchLosses:
    """Run the model once (no labels: the model computes no loss of its own) and derive per-sample losses."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    labels = batch["labels"]
    tok = per_token_losses(outputs.logits, labels)
    return MicroBatchLosses(
        token_loss_sum=tok.sum(dim=1),
        token_count=count_supervised_tokens(labels),
        window_tokens=window_tokens,
        num_processes=num_processes,
        sample_id=batch.get("sample_id"),
        domain_id=batch.get("domain_id"),
        token_losses=tok,
        labels=labels,
    )


# ----------------------------------------------------------------------------------------- loss strategies


@dataclass
class StepInputs:
    """One optimizer step as a loss strategy sees it before the first forward pass."""

    accelerator: Any
    model: torch.nn.Module
    batches: list[dict[str, torch.Tensor]]  # this process's micro-batches
    ghost: bool  # this process has no sample in the step (a zero-weight pass keeps collectives in step)
    global_step: int
    gradient_accumulation_steps: int
    context: Callable[[int], TrainContext]  # the TrainContext of micro-batch i


class LossStrategy:
    """What the loop back-propagates for each micro-batch of an optimizer step."""

    def start_step(self, step: StepInputs) -> None:
        """Once per optimizer step, before its first forward pass (pre-passes, gathers)."""

    def loss(
        self, losses: MicroBatchLosses, ctx: TrainContext, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def ghost(self, losses: MicroBatchLosses) -> None:
        """This process's zero-weight pass of a short last step: meet the others' collectives."""


class TokenMeanLoss(LossStrategy):
    """The HF Trainer's loss: token mean over the whole accumulation window."""

    def loss(
        self, losses: MicroBatchLosses, ctx: TrainContext, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return losses.standard_loss()


@dataclass
class WeightingContext(TrainContext):
    """A TrainContext with what a weighter needs: the micro-batch's losses and every sample's score in the step.

    As in DataFlex, where the weighter's ctx is the HF Trainer, `args` has the HF `TrainingArguments` names
    (`local_rank`, `world_size`, ... over the run's arguments) and `state` the `TrainerState` ones (`global_step`, ...):
    see `dataflex.compat.trainer_fields`."""

    state: TrainerState | None = None
    warmup_step: int = 0
    batch_losses: MicroBatchLosses | None = None  # this micro-batch's losses (token sums, counts, domain ids)
    step_scores: torch.Tensor | None = None  # every sample's score in the optimizer step, all processes
    step_domains: torch.Tensor | None = None  # their domain ids, same order
    sample_offset: int = 0  # where this micro-batch's samples start in `step_scores`

    @property
    def domain_ids(self) -> torch.Tensor | None:
        return self.batch_losses.domain_id if self.batch_losses is not None else None


class WeightedLoss(LossStrategy):
    """A weighter's loss from `warmup_step` on (the standard loss before).

    A `StepWeighter` normalises its weights over the whole optimizer step, so it needs every sample's score
    before the first backward: with one micro-batch the training forward's losses are the scores; otherwise a
    no-grad pre-pass scores them (`score_batch`). Scores are gathered from every process in rank order; each
    micro-batch knows where its samples start (`sample_offset`). A seed-page weighter (`get_weighted_loss` on one
    micro-batch) gives a micro-batch mean, which the step averages."""

    def __init__(self, weighter: Any, warmup_step: int = 0, name: str = "weighter") -> None:
        from dataflex.compat import trainer_fields  # here: compat builds on this module

        self.weighter, self.warmup_step, self.name = weighter, warmup_step, name
        self._trainer_fields = trainer_fields
        self.step_wide = bool(getattr(weighter, "needs_step_scores", False))
        self._active = False

    def start_step(self, step: StepInputs) -> None:
        self._step = step
        self._active = step.global_step >= self.warmup_step
        self._scores: tuple[Any, Any] | None = None
        self._offset = 0
        if not self._active:
            return
        local = 0 if step.ghost else sum(b["input_ids"].shape[0] for b in step.batches)
        self._first = self._sample_offset(local)
        self._scores = self._prepass()

    def _sample_offset(self, local_count: int) -> int:
        """Where this process's samples start in the step's gathered scores (the sum of lower ranks' shares)."""
        acc = self._step.accelerator
        if acc.num_processes == 1:
            return 0
        counts = acc.gather(torch.tensor([local_count], device=acc.device)).tolist()
        return int(sum(counts[: acc.process_index]))

    def _gather(self, scores: list[torch.Tensor], domains: list[torch.Tensor | None]) -> tuple[Any, Any]:
        local = torch.cat([s.float() for s in scores])
        dom = torch.cat(
            [d if d is not None else torch.zeros_like(s, dtype=torch.long) for s, d in zip(scores, domains)]
        )
        acc = self._step.accelerator
        if acc.num_processes > 1:
            local, dom = gather_varlen(acc, local), gather_varlen(acc, dom)
        return local, dom

    def _prepass(self) -> tuple[Any, Any] | None:
        """Scores of the whole step before the first backward, when one forward cannot provide them. The decision
        must be the same on every process (they all gather): it uses the accumulation steps, not the local count."""
        step = self._step
        if not self.step_wide:
            return None
        if step.gradient_accumulation_steps == 1 and getattr(self.weighter, "scores_from_losses", True):
            return None
        ctx = step.context(0)
        with torch.no_grad(), step.accelerator.autocast():
            scores = [self.weighter.score_batch(step.model, b, ctx) for b in step.batches]
        if step.ghost:
            scores = [s[:0] for s in scores]
        return self._gather(scores, [None if step.ghost else b.get("domain_id") for b in step.batches])

    def ghost(self, losses: MicroBatchLosses) -> None:
        if self._active and self._scores is None:
            self._gather([losses.per_sample_loss.detach()[:0]], [None])  # meet the others' gather

    def loss(
        self, losses: MicroBatchLosses, ctx: TrainContext, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        if not self._active:
            return losses.standard_loss()
        if self._scores is None:  # one micro-batch: the training forward's losses are the scores
            self._scores = self._gather([losses.per_sample_loss.detach()], [losses.domain_id])
        fields = {k: getattr(ctx, k) for k in ctx.__dataclass_fields__}
        wctx = WeightingContext(
            **{**fields, **self._trainer_fields(ctx)},
            warmup_step=self.warmup_step,
            batch_losses=losses,
            step_scores=self._scores[0],
            step_domains=self._scores[1],
            sample_offset=self._first + self._offset,
        )
        self._offset += batch["input_ids"].shape[0]
        loss = self.weighter.get_weighted_loss(losses.per_sample_loss, ctx=wctx, model=model, inputs=batch)
        where = f"weighter '{self.name}' at step {ctx.global_step}"
        if not torch.is_tensor(loss) or loss.dim() != 0:
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise WeighterError(f"{where} returned {shape}, not a scalar loss; return one number per micro-batch")
        if not torch.isfinite(loss):
            raise WeighterError(f"{where} returned a non-finite loss ({float(loss.detach())}); check its weights")
        if loss.detach() < 0:
            raise WeighterError(f"{where} returned a negative loss ({float(loss.detach()):.4g}): weights must be >= 0")
        if not self.step_wide:
            loss = loss / ctx.num_micro_batches
        return loss
