"""Weighter base classes.

`Weighter` has the seed page's interface: subclasses implement `get_weighted_loss(losses, *, ctx, model,
inputs) -> scalar` for one micro-batch. The loop's `WeightedLoss` strategy calls it with per-sample losses
computed once in fp32 by the training forward; such a weighter's loss is a micro-batch quantity, averaged over
the accumulation window as DataFlex does. A weighter is a `Callback`: its state is in every TrainState.
Its `ctx` also has what DataFlex's weighters read from the HF Trainer they were given: `ctx.state.global_step`,
`ctx.args.local_rank`, `ctx.args.world_size`, ... (`dataflex.compat.trainer_fields`).

`StepWeighter` is what the built-in weighters use. It fixes two DataFlex problems:
weights are computed over the whole optimizer step (every micro-batch, every process) rather than per
micro-batch, and they are relative weights with mean 1 applied to each sample's token-sum loss over the
window's token count, so uniform weights give exactly the standard loss (no scale jump at `warmup_step`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from dataflex.train.trainer.callbacks import Callback
from dataflex.train.trainer.losses import WeighterError, forward_losses

__all__ = ["NORMALIZATIONS", "StepWeighter", "Weighter"]


class Weighter(Callback, ABC):
    # A StepWeighter needs every sample's score of the optimizer step before the first backward.
    needs_step_scores = False

    def __init__(self, **kwargs: Any) -> None:
        # DataFlex passes runtime objects by keyword; keep what arrives so subclasses can use it.
        self.runtime = dict(kwargs)

    @abstractmethod
    def get_weighted_loss(
        self,
        losses: torch.Tensor,
        *,
        ctx: Any = None,
        model: nn.Module | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Weighted scalar loss from this micro-batch's per-sample losses (B,)."""

    def _per_sample_loss_from_logits(
        self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
    ) -> torch.Tensor:
        """Token-mean loss of each row (B,) from logits and unshifted labels (DataFlex's helper, same result)."""
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        num_active = (shift_labels != ignore_index).sum(dim=1)
        tok = torch.nn.functional.cross_entropy(
            shift_logits.view(-1, shift_logits.size(-1)),
            shift_labels.view(-1).long(),
            ignore_index=ignore_index,
            reduction="none",
        )
        return tok.view(shift_logits.size(0), -1).sum(dim=1) / num_active.clamp(min=1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


NORMALIZATIONS = ("mean_one", "none")


class StepWeighter(Weighter):
    """Weights over the whole optimizer step; subclasses implement `compute_weights`.

    `normalize` says how they reach the loss. `mean_one` (the default): relative weights, rescaled to mean 1 over
    the step, on each sample's token-sum loss over the step's token count (uniform weights = the standard loss).
    `none`: absolute weights on each sample's token-mean loss, averaged over the step's samples — a per-sample
    learning rate, as DataFlex's ADAPT applies them (DataFlex summed over each micro-batch instead, so its scale
    also grew with the batch size)."""

    needs_step_scores = True
    # The score of a sample is its loss, so with one micro-batch the training forward provides it.
    scores_from_losses = True
    normalize = "mean_one"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._weights_step: int | None = None
        self._weights: torch.Tensor | None = None
        self._reset_stats()

    @abstractmethod
    def compute_weights(self, scores: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Non-negative weights (any scale) for the step's samples from their scores (all processes, rank order)."""

    def score_batch(self, model: nn.Module, inputs: dict[str, Any], ctx: Any) -> torch.Tensor:
        """Per-sample scores of one micro-batch for the no-grad pre-pass (default: the token-mean loss)."""
        return forward_losses(model, inputs, window_tokens=1).per_sample_loss.detach()

    def step_weights(self, ctx: Any) -> torch.Tensor:
        """Relative weights (mean 1) of every sample in the step; computed once per optimizer step."""
        if self._weights_step != ctx.global_step:
            raw = self.compute_weights(ctx.step_scores, ctx).detach().float()
            if raw.shape != ctx.step_scores.shape or not torch.isfinite(raw).all() or (raw < 0).any() or raw.sum() <= 0:
                raise WeighterError(
                    f"weighter '{type(self).__name__}' at step {ctx.global_step} gave invalid weights "
                    f"(need {tuple(ctx.step_scores.shape)} finite, >= 0, not all 0): {raw.tolist()[:8]}"
                )
            self._weights = raw if self.normalize == "none" else raw * (raw.numel() / raw.sum())
            self._weights_step = ctx.global_step
            self._record(self._weights, ctx.step_domains, ctx.domain_names)
        return self._weights

    def get_weighted_loss(
        self,
        losses: torch.Tensor,
        *,
        ctx: Any = None,
        model: nn.Module | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        weights = self.step_weights(ctx)
        m = weights[ctx.sample_offset : ctx.sample_offset + losses.numel()].to(losses.device)
        batch = ctx.batch_losses
        if self.normalize == "none":
            # sum_b w_b * (token-mean loss of b) / samples in the step (all micro-batches, all processes)
            return (m * losses).sum() * batch.num_processes / weights.numel()
        # sum_b m_b * (token-sum loss of b) / window tokens: the standard loss when every m_b = 1
        return (m * losses * batch.token_count).sum() * batch.num_processes / max(batch.window_tokens, 1)

    # -- weight statistics, averaged over the steps of a logging interval ----------------------------

    def _reset_stats(self) -> None:
        self._stats: dict[str, float] = {"steps": 0, "min": 0.0, "max": 0.0, "std": 0.0, "entropy": 0.0}
        self._domain_stats: dict[str, list[float]] = {}

    def _record(self, w: torch.Tensor, domains: torch.Tensor | None, names: list[str]) -> None:
        p = w / w.sum()
        entropy = float(-(p * p.clamp_min(1e-30).log()).sum()) / math.log(max(w.numel(), 2))
        st = self._stats
        st["steps"] += 1
        st["mean"] = st.get("mean", 0.0) + float(w.mean())
        st["min"] += float(w.min())
        st["max"] += float(w.max())
        st["std"] += float(w.std()) if w.numel() > 1 else 0.0
        st["entropy"] += entropy
        if domains is not None:
            for d in domains.unique().tolist():
                name = names[d] if d < len(names) else str(d)
                acc = self._domain_stats.setdefault(name, [0.0, 0.0])
                sel = w[domains.to(w.device) == d]
                acc[0] += float(sel.sum())
                acc[1] += sel.numel()

    def metrics(self) -> dict[str, float]:
        """Weight statistics since the last log line (relative weights have mean 1 by construction); `entropy` is
        normalised to [0, 1] (1 = uniform)."""
        st = self._stats
        if not st["steps"]:
            return {}
        n = st["steps"]
        out = {
            "weights/mean": st.get("mean", float(n)) / n,
            "weights/min": st["min"] / n,
            "weights/max": st["max"] / n,
            "weights/std": st["std"] / n,
            "weights/entropy": st["entropy"] / n,
        }
        out.update({f"weights/domain/{k}": v[0] / v[1] for k, v in self._domain_stats.items() if v[1]})
        self._reset_stats()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self._stats, "domain_stats": self._domain_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stats = dict(state.get("stats", self._stats))
        self._domain_stats = {k: list(v) for k, v in state.get("domain_stats", {}).items()}
