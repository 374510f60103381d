"""`adapt` weighter: per-sample weights from similarity to an anchor set (Zhao et al., ICLR 2026, ADAPT).

phi(x) = normalize(sum_t w_t h_t), w_t = t * mask_t / sum_s s * mask_s: a position-weighted mean of the last
hidden states (later tokens count more). The anchor set is `eval_dataset`; the mean anchor embedding A is
refreshed with the current model every `refresh_interval` optimizer steps (once per step, not once per
micro-batch as in DataFlex). score(x) = <phi(x), A> (the mean cosine to the anchors), raw weight
sigmoid(score / tau), optionally min(., clip). `normalize: mean_one` (the default) rescales them to mean 1 over
the optimizer step (relative weights); `normalize: none` keeps DataFlex's absolute weights, a per-sample learning
rate on each sample's mean loss (see `StepWeighter`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_weighter

from .base_weighter import NORMALIZATIONS, StepWeighter


def position_weighted_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """normalize(sum_t w_t h_t) with w_t proportional to the 1-based position t of each real token."""
    mask = attention_mask.to(hidden.dtype)
    positions = torch.cumsum(mask, dim=1) * mask
    weights = positions / positions.sum(dim=1, keepdim=True).clamp_min(1)
    return F.normalize((weights.unsqueeze(-1) * hidden).sum(dim=1).float(), dim=-1)


@register_weighter("adapt")
class AdaptWeighter(StepWeighter):
    scores_from_losses = False  # scores are embedding similarities: always scored in the pre-pass

    def __init__(
        self,
        eval_dataset: Any = None,
        data_collator: Any = None,
        tau: float = 1.0,
        refresh_interval: int = 50,
        anchor_batch_size: int = 8,
        clip: float | None = None,
        normalize: str = "mean_one",
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if eval_dataset is None or len(eval_dataset) == 0:
            raise ConfigError("weighter 'adapt' needs an eval_dataset (its anchor set); set eval_dataset or val_size")
        if data_collator is None:
            raise ConfigError("weighter 'adapt' needs the data_collator runtime object")
        self.check_params(locals())
        self.anchors = eval_dataset.select_columns(["input_ids", "labels"])
        self.collator = data_collator
        self.tau, self.refresh_interval, self.anchor_batch_size, self.clip = (
            max(tau, eps),  # DataFlex's eps: a floor under the temperature
            refresh_interval,
            anchor_batch_size,
            clip,
        )
        self.normalize = normalize
        self.anchor_mean: torch.Tensor | None = None
        self.anchor_step: int | None = None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        tau, clip = params["tau"], params["clip"]
        if (
            not tau > 0
            or params["refresh_interval"] < 1
            or params["anchor_batch_size"] < 1
            or (clip is not None and not clip > 0)
        ):
            raise ConfigError("weighter 'adapt': tau and clip must be > 0, refresh_interval and anchor_batch_size >= 1")
        if params["normalize"] not in NORMALIZATIONS:
            raise ConfigError(
                f"weighter 'adapt': normalize must be one of {', '.join(NORMALIZATIONS)}, got {params['normalize']!r}"
            )

    @torch.no_grad()
    def embed(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        was_training = model.training
        model.eval()  # embeddings without dropout noise
        try:
            out = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            )
        finally:
            model.train(was_training)
        return position_weighted_embedding(out.hidden_states[-1], inputs["attention_mask"])

    def _refresh(self, model: nn.Module, ctx: Any) -> None:
        due = self.anchor_mean is None or (
            ctx.global_step % self.refresh_interval == 0 and self.anchor_step != ctx.global_step
        )
        if not due:
            return
        device = next(model.parameters()).device
        total, count = None, 0
        for start in range(0, len(self.anchors), self.anchor_batch_size):
            rows = self.anchors[start : start + self.anchor_batch_size]
            batch = self.collator([{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))])
            emb = self.embed(model, {k: v.to(device) for k, v in batch.items()})
            total = emb.sum(0) if total is None else total + emb.sum(0)
            count += emb.shape[0]
        self.anchor_mean = total / count
        self.anchor_step = ctx.global_step

    def score_batch(self, model: nn.Module, inputs: dict[str, Any], ctx: Any) -> torch.Tensor:
        self._refresh(model, ctx)
        return self.embed(model, inputs) @ self.anchor_mean.to(inputs["input_ids"].device)

    def compute_weights(self, scores: torch.Tensor, ctx: Any) -> torch.Tensor:
        w = torch.sigmoid(scores / self.tau)
        return torch.clamp(w, max=self.clip) if self.clip is not None else w

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["anchor_step"] = self.anchor_step
        state["anchor_mean"] = self.anchor_mean.tolist() if self.anchor_mean is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.anchor_step = state.get("anchor_step")
        mean = state.get("anchor_mean")
        self.anchor_mean = torch.tensor(mean) if mean is not None else None
