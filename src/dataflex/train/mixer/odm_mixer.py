"""`odm` mixer: online data mixing as a multi-armed bandit (Albalak et al., 2023, arXiv 2312.02406).

Every optimizer step after `warmup_steps` (global steps), each domain's loss L_i is its token-mean training
loss over that step (all micro-batches, all processes). The batches are mixtures, so every domain present in the
step is observed; DataFlex credited the whole micro-batch loss to the first sample's domain. `reward` chooses the
reward estimate (domains absent from the step keep R_i in both):
  full_information (default)   R_i <- alpha R_i + (1 - alpha) * reward_scale * L_i
  importance_weighted          R_i <- alpha R_i + (1 - alpha) * reward_scale * L_i / pi_i
then, with t = steps since warmup,
  eps_t = max(min_exploration_rate, min(1/k, sqrt(ln k / (k t))))
  pi_i  = (1 - k eps_t) softmax(eps_{t-1} R)_i + eps_t
The policy is applied to the sampler at once (every step, as in the paper); `mix()` returns the current policy.

`full_information` is this project's variant: it uses every domain's own loss each step with no 1/pi weight,
since mixed batches observe every arm (the EXP3 importance weight corrects for bandit feedback, which this
is not). It is neither the paper's estimator nor the original repository's `SmoothedMeanWeightUpdater`
(online-data-mixing, megatron/data/data_sampling_utils.py), which smooths exp(L), not L, and whose
`group_update` normalises linearly rather than by softmax.
`importance_weighted` is the paper's estimator (EXP3's importance weight inside ODM's moving average, the formula
DataFlex's docstring gives): only sampled arms are credited, with L/pi_i, pi_i being the probability the arm was
sampled with (the policy this step's rows were drawn from); the repository's `Exp3WeightUpdater` credits sampled
arms the same way (L/pi, in a running sum). Here a domain counts as sampled when it has rows in the step.

Each update is also a line of DataFlex's `odm_weights.jsonl` in the run's output_dir (`step`, `timestamp`,
`domain_names`, `domain_weights`, `estimated_rewards`, `exploration_rate`, `alpha`); DataFlex wrote one per mix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.compat import StepLog, odm_weights_entry
from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_mixer
from dataflex.train.dataset.mixed_proportion_manager import check_proportions

from .base_mixer import Mixer
from .domain_losses import domain_sums, reduce_across_processes


def odm_policy(rewards: np.ndarray, eps_prev: float, eps: float) -> np.ndarray:
    k = len(rewards)
    x = eps_prev * rewards
    soft = np.exp(x - x.max())
    soft /= soft.sum()
    pi = max(1.0 - k * eps, 0.0) * soft + eps
    return pi / pi.sum()


def exploration_rate(t: int, k: int, floor: float) -> float:
    return max(floor, min(1.0 / k, math.sqrt(math.log(k) / (k * max(t, 1)))))


REWARDS = ("full_information", "importance_weighted")


def odm_rewards(
    rewards: np.ndarray,
    losses: np.ndarray,
    seen: np.ndarray,
    pi: np.ndarray,
    alpha: float,
    reward_scale: float,
    reward: str = "full_information",
) -> np.ndarray:
    """One EMA step of the estimated rewards from the step's per-domain mean losses; arms not `seen` keep theirs.
    `pi` is the policy the step was sampled from (used by `importance_weighted` only)."""
    r = reward_scale * np.asarray(losses, dtype=np.float64)
    if reward == "importance_weighted":
        # Floored as DataFlex does: a drawn arm can have pi = 0 only through the sampler's rounding carry.
        r = r / np.maximum(np.asarray(pi, dtype=np.float64), 1e-8)
    return np.where(seen, alpha * rewards + (1 - alpha) * r, rewards)


@register_mixer("odm")
class ODMMixer(Mixer):
    def __init__(
        self,
        mixture_manager: Any,
        accelerator: Any = None,
        alpha: float = 0.9,
        warmup_steps: int = 2000,
        reward_scale: float = 15.0,
        min_exploration_rate: float = 0.03,
        initial_proportions: Sequence[float] | None = None,
        output_dir: str | None = None,
        reward: str = "full_information",
    ) -> None:
        super().__init__(mixture_manager)
        k = len(mixture_manager.names)
        if k < 2:
            raise ConfigError("mixer 'odm' needs at least two domains")
        self.check_params(locals())
        if not min_exploration_rate <= 1 / k:
            raise ConfigError(f"mixer 'odm': min_exploration_rate must be <= 1/k ({1 / k:.3g}) for {k} domains")
        self.accelerator = accelerator
        self.alpha, self.warmup_steps = alpha, warmup_steps
        self.reward_scale, self.min_exploration_rate = reward_scale, min_exploration_rate
        self.reward = reward
        if initial_proportions is not None:
            mixture_manager.set_proportions(check_proportions(initial_proportions, k, "odm initial_proportions"))
        self.rewards = np.zeros(k)
        self.eps = 1.0 / k
        self._step_sums = torch.zeros(2, k, dtype=torch.float64)
        self.weights_log = StepLog(Path(output_dir) / "odm_weights.jsonl") if output_dir else None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        p = params
        if not 0 <= p["alpha"] < 1 or p["warmup_steps"] < 0 or p["reward_scale"] <= 0 or p["min_exploration_rate"] < 0:
            raise ConfigError(
                "mixer 'odm': need 0 <= alpha < 1, warmup_steps >= 0, reward_scale > 0, min_exploration_rate >= 0"
            )
        if p["reward"] not in REWARDS:
            raise ConfigError(f"mixer 'odm': unknown reward {p['reward']!r}; use one of {', '.join(REWARDS)}")

    def on_micro_batch(self, losses: Any, ctx: Any) -> None:
        if losses.domain_id is not None:
            sums = domain_sums(losses.token_loss_sum, losses.token_count, losses.domain_id, len(self.rewards))
            self._step_sums += sums.cpu()

    def on_step_end(self, ctx: Any, logs: dict[str, float]) -> None:
        sums = reduce_across_processes(self._step_sums, ctx.accelerator)
        self._step_sums.zero_()
        if ctx.global_step <= self.warmup_steps:
            return
        seen = (sums[1] > 0).numpy()
        losses = (sums[0] / sums[1].clamp(min=1)).numpy()
        # The manager still holds the proportions this step's rows were drawn with: pi for the importance weight.
        pi = self.mixture_manager.proportions
        self.rewards = odm_rewards(self.rewards, losses, seen, pi, self.alpha, self.reward_scale, self.reward)
        eps_prev = self.eps
        self.eps = exploration_rate(ctx.global_step - self.warmup_steps, len(self.rewards), self.min_exploration_rate)
        policy = self.mixture_manager.set_proportions(odm_policy(self.rewards, eps_prev, self.eps))
        if self.weights_log is not None and (ctx.accelerator is None or ctx.accelerator.is_main_process):
            names = self.mixture_manager.names
            entry = odm_weights_entry(ctx.global_step, names, policy, self.rewards, self.eps, self.alpha)
            self.weights_log.append(entry)

    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        return self.mixture_manager.proportions.copy()

    def stats(self) -> dict[str, Any]:
        return {"rewards": self.rewards.tolist(), "exploration_rate": self.eps}

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": self.rewards.tolist(), "eps": self.eps, "step_sums": self._step_sums.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.rewards = np.asarray(state["rewards"], dtype=np.float64)
            self.eps = float(state["eps"])
            self._step_sums = torch.tensor(state["step_sums"], dtype=torch.float64)
