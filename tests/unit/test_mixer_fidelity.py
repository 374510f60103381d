"""Fidelity of the ODM and DoReMi mixers to their papers' code, checked against hand computations: ODM's two reward
estimators on one bandit step, DoReMi's proxy-loss normalisation (doremi/trainer.py) on a hand-made batch, and the
DoReMi steps' models (a small proxy for reference and proxy, the large model for the final run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.train.dataset.mixed_proportion_manager import MixedProportionManager
from dataflex.train.trainer.losses import MicroBatchLosses, StepInputs


class _Ctx:
    def __init__(self, step: int) -> None:
        self.global_step = step
        self.accelerator = None


def _odm(reward: str, pi: list[float]) -> tuple[object, MixedProportionManager]:
    manager = MixedProportionManager(["a", "b", "c"], [10, 10, 10])
    cfg = {
        "alpha": 0.5,
        "warmup_steps": 24,  # the first update is t = 1 after warm-up, at global step 25
        "reward_scale": 2.0,
        "min_exploration_rate": 0.0,
        "initial_proportions": pi,
        "reward": reward,
    }
    return REGISTRY.build("mixer", "odm", runtime={"mixture_manager": manager}, cfg=cfg), manager


def _step(mixer: object, step: int) -> None:
    """One optimizer step's micro-batch: domain a has rows with loss sums 2 and 4 over 1 token each (mean 3),
    domain b one row with 3 over 2 tokens (mean 1.5), domain c no row."""
    losses = MicroBatchLosses(
        token_loss_sum=torch.tensor([2.0, 3.0, 4.0]),
        token_count=torch.tensor([1, 2, 1]),
        window_tokens=4,
        domain_id=torch.tensor([0, 1, 0]),
    )
    mixer.on_micro_batch(losses, _Ctx(step - 1))
    mixer.on_step_end(_Ctx(step), {})


def test_odm_importance_weighted_bandit_steps_by_hand():
    mixer, manager = _odm("importance_weighted", [0.5, 0.3, 0.2])
    for step in range(1, 25):  # warm-up: nothing learned, the proportions stay ODM's initial ones
        _step(mixer, step)
    assert mixer.rewards.tolist() == [0.0, 0.0, 0.0] and manager.proportions.tolist() == [0.5, 0.3, 0.2]

    _step(mixer, 25)  # t = 1: eps_1 = min(1/3, sqrt(ln 3 / 3)) = 1/3, so the policy is uniform
    # sampled arms only, credited with scale * L / pi at the policy the step was drawn from (0.5, 0.3, 0.2):
    r1 = [0.5 * 0 + 0.5 * 2.0 * 3.0 / 0.5, 0.5 * 0 + 0.5 * 2.0 * 1.5 / 0.3, 0.0]  # [6.0, 5.0, 0.0]
    assert mixer.rewards.tolist() == pytest.approx(r1, rel=1e-12)
    assert r1 == pytest.approx([6.0, 5.0, 0.0])
    assert manager.proportions.tolist() == pytest.approx([1 / 3] * 3, rel=1e-12)

    _step(mixer, 26)  # t = 2: this step was drawn from the uniform policy
    r2 = [0.5 * 6.0 + 0.5 * 2.0 * 3.0 * 3, 0.5 * 5.0 + 0.5 * 2.0 * 1.5 * 3, 0.0]  # [12.0, 7.0, 0.0]
    assert mixer.rewards.tolist() == pytest.approx(r2, rel=1e-12)
    eps2 = math.sqrt(math.log(3) / (3 * 2))  # 0.4279... > 1/3: still pure exploration
    assert eps2 > 1 / 3 and manager.proportions.tolist() == pytest.approx([1 / 3] * 3, rel=1e-12)


def test_odm_policy_after_warm_up_by_hand_for_both_estimators():
    """One bandit step late enough that exploration no longer dominates: 3 arms, losses 3 / 1.5 / unseen,
    pi = (0.5, 0.3, 0.2), alpha 0.5, scale 2, t = 25 (eps = sqrt(ln 3 / 75) < 1/3), eps_prev = 1/3."""
    eps = math.sqrt(math.log(3) / (3 * 25))
    cases = {
        # R = 0.5 * 0 + 0.5 * 2 * L / pi for the sampled arms: (6, 5, 0); softmax(R / 3) ~ (e^2, e^(5/3), 1)
        "importance_weighted": ([6.0, 5.0, 0.0], [math.exp(2.0), math.exp(5 / 3), 1.0]),
        # R = 0.5 * 2 * L: (3, 1.5, 0); softmax(R / 3) ~ (e^1, e^(1/2), 1)
        "full_information": ([3.0, 1.5, 0.0], [math.exp(1.0), math.exp(0.5), 1.0]),
    }
    for reward, (rewards, e) in cases.items():
        mixer, manager = _odm(reward, [0.5, 0.3, 0.2])
        mixer.warmup_steps, mixer.eps = 0, 1 / 3  # the first update after a warm-up, at t = 25
        _step(mixer, 25)
        assert mixer.rewards.tolist() == pytest.approx(rewards, rel=1e-12), reward
        assert mixer.eps == pytest.approx(eps, rel=1e-12)
        by_hand = [(1 - 3 * eps) * x / sum(e) + eps for x in e]
        assert manager.proportions.tolist() == pytest.approx(by_hand, rel=1e-12), reward


def test_odm_reward_is_value_checked():
    from dataflex.train.mixer.odm_mixer import ODMMixer

    with pytest.raises(ConfigError, match="unknown reward 'exp3'; use one of full_information, importance_weighted"):
        REGISTRY.check("mixer", "odm", {"reward": "exp3"})
    with pytest.raises(ConfigError, match="unknown reward"):
        ODMMixer(MixedProportionManager(["a", "b"], [3, 3]), reward="Importance_Weighted")
    REGISTRY.check("mixer", "odm", {"reward": "importance_weighted"})  # valid: no error
    assert ODMMixer(MixedProportionManager(["a", "b"], [3, 3])).reward == "full_information"  # the default


# ----------------------------------------------------------------------------------------------------- DoReMi


def test_doremi_proxy_loss_formula_by_hand():
    """doremi/trainer.py (DoReMiTrainer.training_step): w = (alpha/p) / sum(alpha/p), loss = sum w l / sum w m."""
    from dataflex.train.mixer.doremi_mixer import domain_loss_weights, doremi_proxy_loss, weighted_mass

    alpha, p = np.array([0.5, 0.3, 0.2]), np.array([0.25, 0.25, 0.5])
    w = domain_loss_weights(alpha, p)  # alpha / p = (2, 1.2, 0.4), sum 3.6
    assert w.tolist() == pytest.approx([5 / 9, 1 / 3, 1 / 9], rel=1e-12)
    wt = torch.tensor(w, dtype=torch.float64)
    dom = torch.tensor([0, 1, 2, 0])
    sums = torch.tensor([3.0, 1.5, 8.0, 0.5], dtype=torch.float64)  # token-loss sums of the rows
    counts = torch.tensor([2, 3, 4, 1])  # their supervised tokens
    # numerator 5/9*3 + 1/3*1.5 + 1/9*8 + 5/9*0.5 = 10/3; mass 5/9*2 + 1/3*3 + 1/9*4 + 5/9*1 = 28/9
    mass = weighted_mass(counts, dom, wt)
    assert float(mass) == pytest.approx(28 / 9, rel=1e-12)
    assert float(doremi_proxy_loss(sums, dom, wt, mass)) == pytest.approx(15 / 14, rel=1e-12)
    assert float(doremi_proxy_loss(sums, dom, wt, mass, gradient_accumulation_steps=2)) == pytest.approx(15 / 28)
    # alpha = p: every w equal, the plain token mean (13 / 10); and the scale does not swing with alpha: equal
    # per-token losses give that loss whatever alpha is (the window-token division gave 2.3 x here)
    u = torch.tensor(domain_loss_weights(p, p), dtype=torch.float64)
    assert float(doremi_proxy_loss(sums, dom, u, weighted_mass(counts, dom, u))) == pytest.approx(13 / 10)
    flat = 0.7 * counts.double()
    for a in ([0.9, 0.05, 0.05], [0.01, 0.01, 0.98]):
        wa = torch.tensor(domain_loss_weights(np.array(a), p), dtype=torch.float64)
        assert float(doremi_proxy_loss(flat, dom, wa, weighted_mass(counts, dom, wa))) == pytest.approx(0.7)


def _labels(counts: list[int], length: int = 6) -> torch.Tensor:
    """Labels whose shifted positions 1..count are supervised (count_supervised_tokens gives `counts`)."""
    labels = torch.full((len(counts), length), -100)
    for i, c in enumerate(counts):
        labels[i, 1 : 1 + c] = 7 + i
    return labels


def _batch(domains: list[int], counts: list[int], sums: list[float]) -> tuple[dict, MicroBatchLosses]:
    labels = _labels(counts)
    tok = torch.zeros(len(counts), labels.shape[1] - 1)
    for i, (c, s) in enumerate(zip(counts, sums)):
        tok[i, :c] = s / c  # the row's token losses, summing to its loss sum
    tok.requires_grad_(True)
    batch = {
        "input_ids": torch.arange(len(counts) * labels.shape[1]).reshape(labels.shape) % 50 + 10,
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
        "domain_id": torch.tensor(domains),
    }
    losses = MicroBatchLosses(
        token_loss_sum=tok.sum(dim=1),
        token_count=(labels[:, 1:] != -100).sum(dim=1),
        window_tokens=sum(counts),
        domain_id=batch["domain_id"],
        token_losses=tok,
        labels=labels,
    )
    return batch, losses


def test_doremi_loss_strategy_normalises_each_micro_batch_by_its_weight_mass(untrained_model_dir):
    """The strategy the loop uses, on a hand-made step of two micro-batches (gradient accumulation 2): each is
    sum w l / (its weight mass) / 2, as in doremi/trainer.py; the window-token division is gone."""
    manager = MixedProportionManager(["a", "b", "c"], [10, 10, 10], init_proportions=[0.25, 0.25, 0.5])
    mixer = REGISTRY.build(
        "mixer",
        "doremi",
        runtime={"mixture_manager": manager},
        cfg={"reference_model_path": str(untrained_model_dir)},
    )
    mixer.alpha = np.array([0.5, 0.3, 0.2])  # w = (5/9, 1/3, 1/9)
    first = _batch([0, 1, 2, 0], [2, 3, 4, 1], [3.0, 1.5, 8.0, 0.5])
    second = _batch([1, 1], [2, 2], [1.0, 3.0])
    strategy = mixer.loss_strategy()
    strategy.start_step(StepInputs(None, None, [first[0], second[0]], False, 0, 2, lambda i: None))
    loss1 = strategy.loss(first[1], None, None, first[0])
    loss2 = strategy.loss(second[1], None, None, second[0])
    assert float(loss1.detach()) == pytest.approx(15 / 14 / 2, rel=1e-6)  # (10/3) / (28/9) / 2
    assert float(loss2.detach()) == pytest.approx((1 / 3 * 4.0) / (1 / 3 * 4) / 2, rel=1e-6)  # domain b alone: 0.5
    loss1.backward()  # the loss carries the graph of the token losses
    assert first[1].token_losses.grad is not None
    assert mixer._step_sums[1].tolist() == [3.0, 7.0, 4.0]  # the excess loss was recorded, per domain tokens


def test_doremi_steps_train_the_proxy_model_then_the_final_model():
    from dataflex.config import RunConfig
    from dataflex.train.modes.mix import doremi_config, doremi_proxy_model

    params = {
        "model": {"model_name_or_path": "big"},
        "doremi": {"proxy_model_name_or_path": "small"},
        "dataflex": {"init_mixture_proportions": [0.5, 0.5]},
    }
    cfg = RunConfig.from_params(params)
    assert doremi_proxy_model(cfg) == "small"
    assert doremi_config(cfg, "reference").model.model_name_or_path == "small"
    proxy = doremi_config(cfg, "proxy", reference_dir="ref")
    assert proxy.model.model_name_or_path == "small"
    assert proxy.dataflex.components["mixers"]["doremi"]["params"]["reference_model_path"] == "ref"
    final = doremi_config(cfg, "final", weights=[0.3, 0.7])
    assert final.model.model_name_or_path == "big" and final.dataflex.init_mixture_proportions == [0.3, 0.7]
    unset = RunConfig.from_params({"model": {"model_name_or_path": "big"}})
    assert doremi_config(unset, "proxy", reference_dir="ref").model.model_name_or_path == "big"  # null: the model
