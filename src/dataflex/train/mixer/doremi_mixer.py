"""`doremi` mixer: DoReMi step 2, the Group-DRO proxy (Xie et al., NeurIPS 2023).

Every optimizer step, on the training forward (all micro-batches, all processes):
  excess_i = sum over domain-i tokens of max(l_proxy - l_ref, 0) / number of domain-i tokens
  alpha'   = alpha * exp(reweight_eta * excess)        (domains absent from the step keep their last excess)
  alpha    = (1 - reweight_eps) alpha' / sum(alpha') + reweight_eps / k
and the proxy trains on the domain-weighted loss sum_b (alpha_d(b) / p_d(b)) * (token-sum loss of b) / window
tokens, p being the sampling proportions (so alpha = p gives the standard loss). The run's result is the
average of alpha over all updates (`average_weights`), which DoReMi step 3 trains on. Sampling itself stays
at the configured proportions: `mix()` returns them unchanged. DataFlex never applied the weighted loss and
updated alpha from one micro-batch every update_step steps.

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
from dataflex.train.trainer.losses import IGNORE_INDEX, LossStrategy, per_token_losses

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

    def proxy_loss(self, losses: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The proxy's domain-weighted loss; also records this micro-batch's per-domain excess loss."""
        with torch.no_grad():
            ref_logits = self.reference(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
            ).logits
            ref_tok = per_token_losses(ref_logits, inputs["labels"])
            mask = (inputs["labels"][:, 1:] != IGNORE_INDEX).to(ref_tok.dtype)
            excess = ((losses.token_losses.detach() - ref_tok).clamp(min=0) * mask).sum(dim=1)
            self._step_sums += domain_sums(excess, losses.token_count, losses.domain_id, len(self.alpha)).cpu()
        p = torch.as_tensor(self.mixture_manager.proportions, dtype=torch.float32, device=losses.token_loss_sum.device)
        a = torch.as_tensor(self.alpha, dtype=torch.float32, device=p.device)
        w = (a / p.clamp(min=1e-8))[losses.domain_id]
        return (w * losses.token_loss_sum).sum() * losses.num_processes / max(losses.window_tokens, 1)

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
    """The DoReMi proxy's loss: each domain's token losses weighted by alpha / p (the mixer's current weights over
    the sampling proportions)."""

    def __init__(self, mixer: DoReMiMixer) -> None:
        self.mixer = mixer

    def loss(self, losses: Any, ctx: Any, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.mixer.proxy_loss(losses, batch)
