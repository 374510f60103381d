"""Mixed sampling core: proportion rules, apportionment without last-domain bias, determinism, resume;
the random, static, ODM and DoReMi mixers' formulas; mix schedule and config errors.
(Training on a mixture is in tests/integration/test_mixing_training.py.)"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.train.dataset.mixed_proportion_manager import MixedProportionManager, apportion, check_proportions
from dataflex.train.trainer import TrainingArguments
from dataflex.train.trainer.plan import MixturePlan


def test_apportion_is_exact_and_unbiased():
    rng = np.random.default_rng(0)
    assert apportion(10, np.array([0.5, 0.3, 0.2]), rng).tolist() == [5, 3, 2]
    p = np.array([0.6, 0.3, 0.1])
    carry = np.zeros(3)
    totals = np.zeros(3)
    for step in range(1, 301):
        c = apportion(8, p, rng, carry)
        assert c.sum() == 8 and c.min() >= 0
        totals += c
        # DataFlex's floor-then-last rule drifts by a sample per step; the carry keeps every domain within one
        assert np.abs(totals - 8 * step * p).max() <= 1


def test_manager_rules_and_errors():
    m = MixedProportionManager(["a", "b"], [30, 10], rule="stratified")
    assert m.proportions.tolist() == [0.75, 0.25] and m.fixed
    with pytest.raises(ConfigError, match="fixes the proportions"):
        m.set_proportions([0.5, 0.5])
    assert MixedProportionManager(["a", "b"], [30, 10], rule="uniform").proportions.tolist() == [0.5, 0.5]
    m = MixedProportionManager(["a", "b"], [30, 10], init_proportions=[7, 3])
    assert m.proportions.tolist() == pytest.approx([0.7, 0.3])
    with pytest.raises(ConfigError, match="3 value"):
        m.set_proportions([0.2, 0.3, 0.5])
    with pytest.raises(ConfigError, match=">= 0"):
        check_proportions([-1, 2], 2)
    with pytest.raises(ConfigError, match="sum to zero"):
        check_proportions([0, 0], 2)
    with pytest.raises(ConfigError, match="no samples"):
        MixedProportionManager(["a", "b"], [3, 0])
    with pytest.raises(ConfigError, match="mixture_sample_rule 'temperature'"):
        MixedProportionManager(["a"], [3], rule="temperature")


def test_draws_are_deterministic_follow_proportions_and_cover_each_domain():
    def run(seed):
        m = MixedProportionManager(["a", "b", "c"], [7, 20, 5], init_proportions=[0.2, 0.5, 0.3], seed=seed)
        return [m.draw(10, step) for step in range(20)], m

    a, m = run(0)
    assert a == run(0)[0] and a != run(1)[0]
    counts = Counter(d for step in a for d, _ in step)
    assert [counts[d] for d in range(3)] == [40, 100, 60]  # exact: 10 per step x proportions
    rows_a = Counter(r for step in a for d, r in step if d == 0)  # 40 draws from 7 rows: 5 full epochs + 5
    assert sorted(rows_a.values()) == [5, 5, 6, 6, 6, 6, 6]  # without replacement within each epoch
    assert m.drawn == [40, 100, 60]


def test_mixture_plan_resume_continues_identically():
    def plan():
        return MixturePlan(MixedProportionManager(["a", "b"], [9, 6], seed=3), [0, 9], 2, 2, num_steps=8)

    full = plan()
    steps = [full.step_batches(s) for s in range(8)]
    assert all(len(mb) == 2 and all(len(b) == 2 for b in mb) for mb in steps)
    assert all(0 <= i < 15 for mb in steps for b in mb for i in b)
    first = plan()
    for s in range(5):
        first.step_batches(s)
    resumed = plan()
    resumed.load_state_dict(first.state_dict())
    assert [resumed.step_batches(s) for s in range(5, 8)] == steps[5:]
    with pytest.raises(RuntimeError, match="sequential"):
        resumed.step_batches(2)
    other = MixturePlan(MixedProportionManager(["a", "b"], [9, 6], seed=4), [0, 9], 2, 2, num_steps=8)
    with pytest.raises(CheckpointError, match="other domains, seed"):
        other.load_state_dict(first.state_dict())


def test_random_and_static_mixers():
    manager = MixedProportionManager(["a", "b", "c"], [3, 3, 3])
    state = np.random.get_state()
    mixer = REGISTRY.build("mixer", "random", runtime={"mixture_manager": manager}, cfg={"seed": 7})
    p1, p2 = mixer.mix(None, 10), mixer.mix(None, 20)
    assert p1.shape == (3,) and p1.sum() == pytest.approx(1) and not np.allclose(p1, p2)
    assert np.allclose(p1, mixer.mix(None, 10))  # reproducible per (seed, step)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global numpy RNG is untouched
    static = REGISTRY.build("mixer", "static", runtime={"mixture_manager": manager}, cfg={"proportions": [2, 1, 1]})
    assert static.mix(None, 0).tolist() == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="static mixer proportions has 2 value"):
        REGISTRY.build("mixer", "static", runtime={"mixture_manager": manager}, cfg={"proportions": [1, 1]})
    # p1 is a usable mixture: a float vector, every domain kept (> 0), not the uniform mix, and the manager takes it.
    assert isinstance(p1, np.ndarray) and p1.dtype.kind == "f" and np.isfinite(p1).all() and (p1 > 0).all()
    assert not np.allclose(p1, np.full(3, 1 / 3))
    manager.set_proportions(p1)
    assert np.allclose(manager.proportions, p1)


def test_mix_schedule_arithmetic():
    from dataflex.config import DynamicConfig
    from dataflex.train.schedule import mix_schedule

    train = TrainingArguments(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    flex = DynamicConfig(warmup_step=3, update_step=5, update_times=2)
    assert mix_schedule(flex, train, 100).boundaries == [3, 8, 13]
    assert mix_schedule(replace(flex, update_times=0, train_step=11), train, 100).boundaries == [3, 8, 11]
    assert mix_schedule(replace(flex, update_times=-1), train, 100).boundaries == [3, 8, 12]  # floor(100/8) = 12
    assert mix_schedule(replace(flex, static_mix=True, train_step=7), train, 100).boundaries == [7]
    with pytest.raises(ConfigError, match="warmup_step >= 1 and update_step >= 1"):
        mix_schedule(replace(flex, update_step=0), train, 100)


def test_mix_config_errors(tmp_path, untrained_model_dir, sft_pool):
    from dataflex.config import DynamicConfig
    from dataflex.train.modes.mix import check_mix_config

    flex = DynamicConfig(warmup_step=1, update_step=1)
    with pytest.raises(ConfigError, match="fixes the proportions"):
        check_mix_config(replace(flex, mixture_sample_rule="uniform"))
    with pytest.raises(ConfigError, match="mixture_sample_rule 'temp' is not valid"):
        check_mix_config(replace(flex, mixture_sample_rule="temp", static_mix=True))
    with pytest.raises(ConfigError, match="at least two domains"):
        check_mix_config(flex, num_domains=1)
    with pytest.raises(ConfigError, match="init_mixture_proportions has 2 value"):
        check_mix_config(replace(flex, init_mixture_proportions=[0.5, 0.5]), num_domains=3)


class _Ctx:
    def __init__(self, step):
        self.global_step = step
        self.accelerator = None


def _losses(domain_ids, sums, counts):
    from dataflex.train.trainer.losses import MicroBatchLosses

    return MicroBatchLosses(
        token_loss_sum=torch.tensor(sums),
        token_count=torch.tensor(counts),
        window_tokens=1,
        domain_id=torch.tensor(domain_ids),
    )


def test_odm_formulas_and_credit_to_each_domain():
    from dataflex.train.mixer.odm_mixer import exploration_rate, odm_policy

    assert exploration_rate(1, 3, 0.03) == pytest.approx(1 / 3)
    assert exploration_rate(400, 3, 0.03) == pytest.approx(max(0.03, (np.log(3) / 1200) ** 0.5))
    pi = odm_policy(np.array([1.0, 2.0, 4.0]), 0.2, 0.1)
    soft = np.exp(0.2 * np.array([1.0, 2.0, 4.0]))
    assert pi.tolist() == pytest.approx((0.7 * soft / soft.sum() + 0.1).tolist())

    manager = MixedProportionManager(["a", "b", "c"], [5, 5, 5])
    mixer = REGISTRY.build(
        "mixer",
        "odm",
        runtime={"mixture_manager": manager},
        cfg={"alpha": 0.5, "warmup_steps": 1, "reward_scale": 2.0, "min_exploration_rate": 0.0},
    )
    # a mixed micro-batch: domain 0 has mean loss 1, domain 1 mean 3, domain 2 absent
    mixer.on_micro_batch(_losses([1, 0, 1], [4.0, 2.0, 8.0], [2, 2, 2]), _Ctx(0))
    mixer.on_step_end(_Ctx(1), {})  # still warming up: nothing learned, the sums are cleared
    assert mixer.rewards.tolist() == [0, 0, 0]
    mixer.on_micro_batch(_losses([1, 0, 1], [4.0, 2.0, 8.0], [2, 2, 2]), _Ctx(1))
    mixer.on_step_end(_Ctx(2), {})
    assert mixer.rewards.tolist() == pytest.approx([0.5 * 2.0 * 1.0, 0.5 * 2.0 * 3.0, 0.0])
    assert manager.proportions.tolist() == pytest.approx([1 / 3] * 3)  # eps_1 = 1/k: pure exploration at first
    for step in range(3, 10):
        mixer.on_micro_batch(_losses([1, 0, 1], [4.0, 2.0, 8.0], [2, 2, 2]), _Ctx(step - 1))
        mixer.on_step_end(_Ctx(step), {})
    p = manager.proportions
    assert p[1] > p[0] > p[2]  # the highest-loss domain gets the most; the unseen one keeps reward 0
    assert mixer.mix(None, 2).tolist() == manager.proportions.tolist()


def test_doremi_update_formula():
    from dataflex.train.mixer.doremi_mixer import doremi_update

    alpha, excess = np.array([0.5, 0.3, 0.2]), np.array([1.0, 0.0, 2.0])
    raw = alpha * np.exp(0.5 * excess)
    assert doremi_update(alpha, excess, 0.5, 0.01).tolist() == pytest.approx(
        (0.99 * raw / raw.sum() + 0.01 / 3).tolist()
    )


def test_doremi_needs_a_reference(tmp_path):
    manager = MixedProportionManager(["a", "b"], [5, 5])
    with pytest.raises(ConfigError, match="needs reference_model_path"):
        REGISTRY.build("mixer", "doremi", runtime={"mixture_manager": manager}, cfg={})
    with pytest.raises(ConfigError, match="does not exist"):
        REGISTRY.build(
            "mixer",
            "doremi",
            runtime={"mixture_manager": manager},
            cfg={"reference_model_path": str(tmp_path / "nope")},
        )
