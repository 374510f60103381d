"""`doremi` mixer: DoReMi step 2, the Group-DRO proxy (Xie et al., NeurIPS 2023).

Every optimizer step, on the training forward (all micro-batches, all processes):
  excess_i = sum over domain-i tokens of max(l_proxy - l_ref, 0) / number of domain-i tokens
  alpha'   = alpha * exp(reweight_eta * excess)        (domains absent from the step keep their last excess)
  alpha    = (1 - reweight_eps) alpha' / sum(alpha') + reweight_eps / k
and the proxy trains on the domain-weighted loss of the DoReMi repository (`doremi/trainer.py`,
`DoReMiTrainer.training_step`, the `doremiv1` branch), for each micro-batch:
  w_d  = (alpha_d / p_d) / sum_j (alpha_j / p_j)          p = the sampling proportions
  loss = sum_t w_d(t) l_t  /  (sum_t w_d(t) m_t / world_size)  /  gradient_accumulation_steps
the sums running over the micro-batch's tokens t (l_t the token loss, m_t its mask), the normaliser over every
process's micro-batch (all-reduced), so the loss is a w-weighted token mean whatever alpha is (alpha = p gives the
micro-batch token mean). The run's result is the average of alpha over all updates (`average_weights`), which
DoReMi step 3 trains on. Sampling itself stays at the configured proportions: `mix()` returns them unchanged.
DataFlex never applied the weighted loss and updated alpha from one micro-batch every update_step steps.

DataFlex's files are written to the run's output_dir in its formats: `doremi_weights.jsonl`, a line per update
(`step`, `timestamp`, `domain_names`, `domain_weights` = alpha, `perdomain_scores` = excess), and at the end of the
proxy run `doremi_average_weights.json` and `doremi_step3_proportions.txt` (`save_average_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.compat import StepLog, doremi_weights_entry, write_doremi_average_weights
from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_mixer
from dataflex.train.trainer.losses import (
    IGNORE_INDEX,
    LossStrategy,
    StepInputs,
    count_supervised_tokens,
    per_token_losses,
)

from .base_mixer import Mixer
from .domain_losses import domain_sums, reduce_across_processes


def load_reference(path: str | None, device: torch.device | str) -> torch.nn.Module:
    """The step-1 reference model: a model dir, or a LoRA adapter dir (merged onto its base)."""
    if not path:
        raise ConfigError("mixer 'doremi' needs reference_model_path (the step-1 model or adapter); set it in params")
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"mixer 'doremi': reference_model_path '{path}' does not exist; train the reference first")
    from dataflex.models import load_model

    try:
        if (p / "adapter_config.json").is_file():
            import json

            base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
            model = load_model(base, finetuning_type="lora", adapter_path=str(p), is_trainable=False)
            model = model.merge_and_unload()
        else:
            model = load_model(str(p), finetuning_type="full", is_trainable=False)
    except Exception as exc:  # noqa: BLE001  # any load failure is a config problem of this path
        raise ConfigError(f"mixer 'doremi': cannot load reference model '{path}': {exc}") from None
    model.eval().requires_grad_(False)
    return model.to(device)


def domain_loss_weights(alpha: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """w = (alpha / p) / sum(alpha / p): the per-domain token weights of the proxy loss (DoReMi's trainer divides by
    the sampling weights, then renormalises)."""
    w = np.asarray(alpha, dtype=np.float64) / np.maximum(np.asarray(proportions, dtype=np.float64), 1e-12)
    return w / w.sum()


def weighted_mass(token_count: torch.Tensor, domain_id: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_d(t) m_t of one micro-batch: each row's supervised-token count times its domain's weight."""
    return (weights[domain_id] * token_count.to(weights.dtype)).sum()


def doremi_proxy_loss(
    token_loss_sum: torch.Tensor,
    domain_id: torch.Tensor,
    weights: torch.Tensor,
    normalizer: float | torch.Tensor,
    gradient_accumulation_steps: int = 1,
) -> torch.Tensor:
    """sum_t w_d(t) l_t / normalizer / GA (doremi/trainer.py, DoReMiTrainer.training_step): a row's token losses
    share its domain's weight, so the token sum is the row's loss sum times w. `normalizer` is the weighted mass
    of the micro-batch over all processes divided by the world size (DDP averages the gradients)."""
    w = weights.to(token_loss_sum.dtype)[domain_id]
    return (w * token_loss_sum).sum() / normalizer / gradient_accumulation_steps


def doremi_update(alpha: np.ndarray, excess: np.ndarray, eta: float, eps: float) -> np.ndarray:
    raw = alpha * np.exp(eta * (excess - excess.max()))  # shift: the normalisation cancels it, overflow cannot
    k = len(alpha)
    return (1 - eps) * raw / raw.sum() + eps / k


@register_mixer("doremi")
class DoReMiMixer(Mixer):
    def __init__(
        self,
        mixture_manager: Any,
        accelerator: Any = None,
        reference_model_path: str | None = None,
        reweight_eta: float = 1.0,
        reweight_eps: float = 1e-3,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(mixture_manager)
        k = len(mixture_manager.names)
        if k < 2:
            raise ConfigError("mixer 'doremi' needs at least two domains")
        self.check_params(locals())
        self.accelerator = accelerator
        device = accelerator.device if accelerator is not None else "cpu"
        self.reference = load_reference(reference_model_path, device)
        self.eta, self.eps = reweight_eta, reweight_eps
        self.alpha = np.full(k, 1.0 / k)
        self.excess = np.zeros(k)
        self.alpha_sum = np.zeros(k)
        self.updates = 0
        self._step_sums = torch.zeros(2, k, dtype=torch.float64)
        self.weights_log = StepLog(Path(output_dir) / "doremi_weights.jsonl") if output_dir else None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if params["reweight_eta"] <= 0 or not 0 <= params["reweight_eps"] <= 1:
            raise ConfigError("mixer 'doremi': reweight_eta must be > 0 and reweight_eps in [0, 1]")

    def loss_strategy(self) -> LossStrategy:
        return DoReMiLoss(self)

    def loss_weights(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The current per-domain token weights w = (alpha / p) / sum(alpha / p), float32 as in DoReMi's trainer."""
        w = domain_loss_weights(self.alpha, self.mixture_manager.proportions)
        return torch.as_tensor(w, dtype=torch.float32, device=device)

    def record_excess(self, losses: Any, inputs: Mapping[str, torch.Tensor]) -> None:
        """Add this micro-batch's per-domain excess loss sum(max(l_proxy - l_ref, 0)) to the step's sums."""
        with torch.no_grad():
            ref_logits = self.reference(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits
            ref_tok = per_token_losses(ref_logits, inputs["labels"])
            mask = (inputs["labels"][:, 1:] != IGNORE_INDEX).to(ref_tok.dtype)
            excess = ((losses.token_losses.detach() - ref_tok).clamp(min=0) * mask).sum(dim=1)
            self._step_sums += domain_sums(excess, losses.token_count, losses.domain_id, len(self.alpha)).cpu()

    def proxy_loss(
        self,
        losses: Any,
        inputs: Mapping[str, torch.Tensor],
        normalizer: float | torch.Tensor | None = None,
        gradient_accumulation_steps: int = 1,
    ) -> torch.Tensor:
        """The proxy's domain-weighted loss (`doremi_proxy_loss`); also records this micro-batch's excess loss.
        Without `normalizer` (the loss strategy passes the all-process one) it is this micro-batch's own mass."""
        self.record_excess(losses, inputs)
        w = self.loss_weights(losses.token_loss_sum.device)
        if normalizer is None:
            normalizer = weighted_mass(losses.token_count, losses.domain_id, w).clamp(min=1e-10)
        return doremi_proxy_loss(losses.token_loss_sum, losses.domain_id, w, normalizer, gradient_accumulation_steps)

    def on_step_end(self, ctx: Any, logs: dict[str, float]) -> None:
        sums = reduce_across_processes(self._step_sums, ctx.accelerator).numpy()
        self._step_sums.zero_()
        seen = sums[1] > 0
        self.excess = np.where(seen, sums[0] / np.maximum(sums[1], 1), self.excess)
        self.alpha = doremi_update(self.alpha, self.excess, self.eta, self.eps)
        self.alpha_sum += self.alpha
        self.updates += 1
        if self.weights_log is not None and (ctx.accelerator is None or ctx.accelerator.is_main_process):
            names = self.mixture_manager.names
            self.weights_log.append(doremi_weights_entry(ctx.global_step, names, self.alpha, self.excess))

    @property
    def average_weights(self) -> np.ndarray:
        return self.alpha_sum / self.alpha_sum.sum() if self.updates else self.alpha.copy()

    def get_current_doremi_weights(self) -> np.ndarray:
        """The current alpha (DataFlex's name)."""
        return self.alpha.copy()

    def save_average_weights(self, output_dir: str) -> None:
        """DataFlex's end-of-proxy files: the averaged weights as JSON and as step-3 proportions."""
        write_doremi_average_weights(output_dir, self.mixture_manager.names, self.average_weights, self.updates)

    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        return self.mixture_manager.proportions.copy()

    def stats(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "average_weights": self.average_weights.tolist(),
            "excess": self.excess.tolist(),
            "updates": self.updates,
        }

    def metrics(self) -> dict[str, float]:
        names = self.mixture_manager.names
        return {f"doremi/alpha/{n}": float(a) for n, a in zip(names, self.alpha)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "excess": self.excess.tolist(),
            "alpha_sum": self.alpha_sum.tolist(),
            "updates": self.updates,
            "step_sums": self._step_sums.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.alpha = np.asarray(state["alpha"])
            self.excess = np.asarray(state["excess"])
            self.alpha_sum = np.asarray(state["alpha_sum"])
            self.updates = int(state["updates"])
            self._step_sums = torch.tensor(state["step_sums"], dtype=torch.float64)


class DoReMiLoss(LossStrategy):
    """The DoReMi proxy's loss: each domain's token losses weighted by w = (alpha / p) / sum(alpha / p) and
    normalised by the weights' mass, as doremi/trainer.py (DoReMiTrainer.training_step) does: per micro-batch,
    mass all-reduced over processes and divided by the world size, the loss then divided by the accumulation
    steps. The masses of every micro-batch of the step are reduced in one collective before its first forward."""

    def __init__(self, mixer: DoReMiMixer) -> None:
        self.mixer = mixer
        self._normalizers: list[float] = []
        self._grad_accum = 1
        self._next = 0

    def start_step(self, step: StepInputs) -> None:
        acc = step.accelerator
        device = acc.device if acc is not None else "cpu"
        w = self.mixer.loss_weights(device)
        # Micro-batch i of every process forms DoReMi's batch i (one dataloader batch over all GPUs).
        n = max(step.gradient_accumulation_steps, len(step.batches))  # the same length on every process
        local = torch.zeros(n, dtype=torch.float32, device=device)
        if not step.ghost:
            for i, batch in enumerate(step.batches):
                count = count_supervised_tokens(batch["labels"]).to(device)
                local[i] = weighted_mass(count, batch["domain_id"].to(device), w)
        world = acc.num_processes if acc is not None else 1
        mass = acc.reduce(local, reduction="sum") if world > 1 else local
        self._normalizers = (mass.clamp(min=1e-10) / world).tolist()  # DoReMi's clip(min=1e-10) / world_size
        self._grad_accum = step.gradient_accumulation_steps
        self._next = 0

    def loss(self, losses: Any, ctx: Any, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        i = self._next
        self._next += 1
        normalizer = self._normalizers[i] if i < len(self._normalizers) else None
        return self.mixer.proxy_loss(losses, batch, normalizer, self._grad_accum)
