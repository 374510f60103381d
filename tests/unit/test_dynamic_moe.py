"""The dynamic_moe mixer's parts without training: Algorithm 1's weight update against a hand computation, gate
loads from real transformers MoE models against each layer's router run by hand, the eval split taken out of
training, freeze_gate and LoRA on routers, and the one-line errors (config time). Training runs (freeze_gate
after training, resume, 2 processes) are in tests/integration/test_dynamic_moe_training.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dataflex.config import flat_to_grouped, validate_params
from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.data import DataCollatorForCausalLM
from dataflex.models import load_model
from dataflex.models.loader import _resolve_lora_targets, check_router, find_router_modules, router_top_k
from dataflex.train.dataset.mixed_proportion_manager import MixedProportionManager
from dataflex.train.mixer.dynamic_moe_mixer import batch_gate_load, dynamic_sampling_update, expert_counts

O_HAT = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, demo_dir: Path) -> Path:
    """The test-size tiny MoE (Mixtral, 4 experts, top-2), untrained: built in about a second."""
    from dataflex.train.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("moe") / "tiny_moe"
    return make_tiny_model(out, demo_dir, size="test", arch="moe", seed=0, pretrain_steps=0, progress_bar=False)


# ------------------------------------------------------------------------------------------------ Algorithm 1


def test_weight_update_equals_a_hand_computation():
    """3 domains x 4 experts, non-uniform previous weights: L2 distances, their mean over all 3 domains (the
    self-distance 0 included), log-weights plus eta x delta, softmax, then the smoothing c / |D|."""
    w_prev, eta, c = [0.5, 0.3, 0.2], 10.0, 0.05
    d01, d02, d12 = math.sqrt(0.2), math.sqrt(0.05), math.sqrt(0.05)  # e.g. d01² = .09 + .01 + .01 + .09
    delta = [(0 + d01 + d02) / 3, (d01 + 0 + d12) / 3, (d02 + d12 + 0) / 3]
    logits = [math.log(w + 1e-10) + eta * d for w, d in zip(w_prev, delta)]
    z = sum(math.exp(v) for v in logits)
    alpha = [math.exp(v) / z for v in logits]
    expected = [(1 - c) * a + c / 3 for a in alpha]

    w, got_delta, got_alpha = dynamic_sampling_update(O_HAT, np.array(w_prev), eta, c)
    assert got_delta.tolist() == pytest.approx(delta, abs=1e-12)
    assert got_alpha.tolist() == pytest.approx(alpha, abs=1e-12)
    assert w.tolist() == pytest.approx(expected, abs=1e-12) and w.sum() == pytest.approx(1.0)
    # Leaving the self-distance out (mean over the 2 others) would give other weights: it is in.
    others = [(d01 + d02) / 2, (d01 + d12) / 2, (d02 + d12) / 2]
    assert not np.allclose(got_delta, others)
    # c = 1 is uniform whatever the loads; equal loads keep the previous weights (up to the smoothing).
    assert dynamic_sampling_update(O_HAT, np.array(w_prev), eta, 1.0)[0].tolist() == pytest.approx([1 / 3] * 3)
    same = np.tile(O_HAT[:1], (3, 1))
    kept = dynamic_sampling_update(same, np.array(w_prev), eta, c)[0]
    assert kept.tolist() == pytest.approx([(1 - c) * w + c / 3 for w in w_prev])


def test_params_are_checked_at_config_time():
    for bad, match in (
        ({"eta": 0.0}, "eta must be > 0"),
        ({"eta": -1}, "eta must be > 0"),
        ({"c": 1.5}, r"c must be in \[0, 1\]"),
        ({"c": -0.1}, r"c must be in \[0, 1\]"),
        ({"collect_steps": 0}, "collect_steps must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=match):
            REGISTRY.check("mixer", "dynamic_moe", bad)
    # DataFlex's components.yaml entry, unchanged.
    REGISTRY.check(
        "mixer",
        "dynamic_moe",
        {"eta": 10.0, "c": 0.05, "collect_steps": 5, "eval_samples": 1000, "eval_batch_size": 32},
    )


# ------------------------------------------------------------------------------------------------ gate loads


def _by_hand(model: nn.Module, batch: dict, top_k: int) -> torch.Tensor:
    """Each router's input captured on the same forward pass, then the router run by hand: logits = h W^T,
    top-k of their softmax, counted over the non-padding tokens only."""
    inputs = []
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, args, out: inputs.append((m.weight, args[0])))
        for name in find_router_modules(model)
    ]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    keep = batch["attention_mask"].reshape(-1).bool()
    total = torch.zeros(inputs[0][0].shape[0], dtype=torch.float64)
    for weight, hidden in inputs:
        logits = hidden.reshape(-1, weight.shape[1])[keep] @ weight.T
        chosen = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1).indices
        for e in chosen.reshape(-1).tolist():
            total[e] += 1
    return total


def _padded_batch(tokenizer, sft_pool) -> dict:
    rows = [sft_pool[i] for i in (0, 45, 90, 3)]
    batch = DataCollatorForCausalLM(tokenizer)(rows)
    assert (batch["attention_mask"] == 0).any()  # the rows differ in length: padding is present
    return batch


def test_gate_loads_of_the_tiny_moe_equal_its_routers_run_by_hand(moe_dir, tokenizer, sft_pool):
    model = load_model(str(moe_dir), finetuning_type="full", device="cpu").eval()
    top_k = router_top_k(model.config)
    assert top_k == 2 and len(find_router_modules(model)) == model.config.num_hidden_layers
    batch = _padded_batch(tokenizer, sft_pool)
    with torch.no_grad():
        got = batch_gate_load(model, batch, top_k)
    expected = _by_hand(model, batch, top_k)
    assert torch.equal(got, expected)
    tokens = int(batch["attention_mask"].sum())
    assert got.sum() == model.config.num_hidden_layers * top_k * tokens  # padding excluded, every layer counted
    # Through LoRA (a PeftModel passes output_router_logits on) the counts are the same.
    lora = load_model(str(moe_dir), finetuning_type="lora", lora_rank=4, device="cpu", seed=0).eval()
    with torch.no_grad():
        assert torch.equal(batch_gate_load(lora, batch, top_k), expected)


def _tiny(arch: str) -> nn.Module:
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    common |= {"num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 64}
    configs = {
        "mixtral": lambda: MixtralConfig(**common, intermediate_size=32, num_local_experts=6),
        "qwen2_moe": lambda: Qwen2MoeConfig(
            **common, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=6
        ),
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=16, num_experts=6),
        "olmoe": lambda: OlmoeConfig(**common, intermediate_size=32, num_experts=6),
    }
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(configs[arch]())
        for name in find_router_modules(model):  # some init routers at zero: every expert would tie
            model.get_submodule(name).weight.data.normal_(0, 1)
    return model.eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_gate_loads_of_transformers_moe_models_equal_their_routers_run_by_hand(arch):
    model = _tiny(arch)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, 64, (3, 9), generator=g),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }
    batch["attention_mask"][0, 5:] = 0
    batch["attention_mask"][2, 7:] = 0
    with torch.no_grad():
        got = batch_gate_load(model, batch, router_top_k(model.config))
    assert torch.equal(got, _by_hand(model, batch, 2)) and got.numel() == 6


def test_llama_moe_style_gate_load_is_summed_over_layers():
    class Out:
        def __init__(self, gate_load):
            self.gate_load = gate_load

    class LlamaMoELike(nn.Module):
        """A model returning LLaMA-MoE's `gate_load`: one count vector per layer (its own counting)."""

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return Out((torch.tensor([3, 1, 0, 4]), torch.tensor([1, 1, 5, 1])))

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    assert batch_gate_load(LlamaMoELike(), batch, None).tolist() == [4.0, 2.0, 5.0, 5.0]

    class Dense(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return Out(None)

    with pytest.raises(ConfigError, match="needs a mixture-of-experts model; Dense returns neither"):
        batch_gate_load(Dense(), batch, 2)
    with pytest.raises(ConfigError, match="no router logits"):
        expert_counts((), None, 2)


# ------------------------------------------------------------------------------------------------ the eval split


def test_hold_out_removes_rows_from_training_and_is_checked_on_resume():
    import datasets

    sources = {n: datasets.Dataset.from_dict({"x": list(range(20))}) for n in ("a", "b")}
    m = MixedProportionManager(["a", "b"], [20, 20], seed=3, sources=sources)
    m.hold_out({"a": [0, 5, 7], "b": [19]})
    assert m.sizes == {"a": 17, "b": 19} and len(m.sources["a"]) == 17 and 5 not in m.sources["a"]["x"]
    drawn = [pair for step in range(12) for pair in m.draw(10, step)]  # 120 draws: several epochs of each domain
    assert {r for d, r in drawn if d == 0}.isdisjoint({0, 5, 7}) and (1, 19) not in drawn
    assert {r for d, r in drawn if d == 0} == set(range(20)) - {0, 5, 7}  # every kept row, by pool row number
    snapshot = m.snapshot()  # DataFlex's `dataset` of mix(): the rows drawn, read from `sources`
    seen = {(snapshot[i]["domain_id"], snapshot[i]["x"]) for i in range(len(snapshot))}
    assert seen.isdisjoint({(0, 0), (0, 5), (0, 7), (1, 19)}) and len(seen) == 17 + 19
    # A resume with the same split continues exactly; another split is refused.
    same = MixedProportionManager(["a", "b"], [20, 20], seed=3, sources=sources)
    same.hold_out({"a": [7, 5, 0], "b": [19]})
    same.load_state_dict(m.state_dict())
    assert same.draw(10, 12) == m.draw(10, 12)
    other = MixedProportionManager(["a", "b"], [20, 20], seed=3, sources=sources)
    with pytest.raises(CheckpointError, match="held other rows out of training"):
        other.load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="before the first draw"):
        m.hold_out({"b": [0]})


def _manager(sft_pool, **kw):
    from dataflex.data import domain_names

    names = domain_names(sft_pool)
    ids = np.asarray(sft_pool["domain_id"])
    sources = {n: sft_pool.select(np.flatnonzero(ids == d)) for d, n in enumerate(names)}
    return MixedProportionManager(names, [len(sources[n]) for n in names], seed=0, sources=sources, **kw)


def _build(manager, tokenizer, tmp_path=None, **params):
    runtime = {"mixture_manager": manager, "data_collator": DataCollatorForCausalLM(tokenizer)}
    if tmp_path is not None:
        runtime["output_dir"] = str(tmp_path)
    return REGISTRY.build("mixer", "dynamic_moe", runtime=runtime, cfg=params)


def test_the_eval_split_is_fixed_and_never_trained_on(sft_pool, tokenizer):
    manager = _manager(sft_pool)
    mixer = _build(manager, tokenizer, eval_samples=8, collect_steps=2, eval_batch_size=3)
    assert manager.sizes == {n: 32 for n in manager.names}  # 40 rows each, 8 split off
    assert all(len(rows) == 6 for rows in mixer.eval_rows.values())  # collect_steps x eval_batch_size of the 8
    held = {n: {r["sample_id"] for r in mixer.eval_sets[d]} for d, n in enumerate(manager.names)}
    trained = {n: set() for n in manager.names}
    for step in range(20):  # 160 draws: every training row of every domain, none held out
        for d, row in manager.draw(8, step):
            trained[manager.names[d]].add(int(sft_pool[d * 40 + row]["sample_id"]))
    assert all(held[n] and trained[n].isdisjoint(held[n]) and len(trained[n]) == 32 for n in manager.names)
    again = _build(_manager(sft_pool), tokenizer, eval_samples=8, collect_steps=2, eval_batch_size=3)
    assert again.eval_rows == mixer.eval_rows and again.mixture_manager.held_out == manager.held_out


def test_a_domain_too_small_to_split_is_one_line(sft_pool, tokenizer):
    with pytest.raises(ConfigError, match=r"domain 'arith_train' has 40 rows, too few to split off eval_samples=1000"):
        _build(_manager(sft_pool), tokenizer)
    with pytest.raises(ConfigError, match="has 40 rows, too few to split off eval_samples=21 .at most half"):
        _build(_manager(sft_pool), tokenizer, eval_samples=21)


def test_mixer_eval_sets_are_used_as_given_and_nothing_is_held_out(sft_pool, tokenizer):
    manager = _manager(sft_pool)
    evals = {n: sft_pool.select(range(d * 40, d * 40 + 5)) for d, n in enumerate(manager.names)}
    manager.mixer_eval_datasets = evals
    mixer = _build(manager, tokenizer)  # eval_samples=1000 does not apply: no split
    assert manager.sizes == {n: 40 for n in manager.names} and not manager.held_out
    assert mixer.eval_source == "mixer_eval_dataset" and all(len(r) == 5 for r in mixer.eval_rows.values())
    assert all(mixer.eval_sets[d] is evals[n] for d, n in enumerate(manager.names))


def test_mix_updates_weights_writes_dataflex_files_and_resumes(moe_dir, sft_pool, tokenizer, tmp_path):
    model = load_model(str(moe_dir), finetuning_type="full", device="cpu")
    mixer = _build(_manager(sft_pool), tokenizer, tmp_path, eval_samples=8, collect_steps=2, eval_batch_size=4)
    w1 = mixer.mix(model, 2)
    assert model.training  # the eval pass restores the mode
    stats = mixer.stats()
    loads = np.asarray(stats["gate_loads"])
    assert loads.shape == (3, 4) and np.allclose(loads.sum(axis=1), 1.0)
    expected = dynamic_sampling_update(loads, np.full(3, 1 / 3), 10.0, 0.05)[0]
    assert w1.tolist() == pytest.approx(expected.tolist()) and stats["weights"] == pytest.approx(w1.tolist())
    state = json.loads(json.dumps(mixer.state_dict()))  # what TrainState and the round files carry
    w2 = mixer.mix(model, 4)  # same model, same rows: the same loads, and the weights move on from w1
    assert w2.tolist() == pytest.approx(dynamic_sampling_update(loads, w1, 10.0, 0.05)[0].tolist())

    resumed = _build(_manager(sft_pool), tokenizer, tmp_path, eval_samples=8, collect_steps=2, eval_batch_size=4)
    resumed.load_state_dict(state)
    assert resumed.mix(model, 4).tolist() == w2.tolist()
    lines = [json.loads(x) for x in (tmp_path / "dynamic_moe_weights.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]  # the resumed run replaced the step-4 line
    assert set(lines[0]) >= {"gate_loads", "delta", "alpha", "new_weights", "eta", "c", "domain_names"}
    assert (tmp_path / "mixture" / "expert_loads.png").stat().st_size > 1000
    other = _build(_manager(sft_pool), tokenizer, eval_samples=8, collect_steps=1, eval_batch_size=4)
    with pytest.raises(CheckpointError, match="other eval rows"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ freeze_gate, LoRA


def test_freeze_gate_freezes_the_routers_only(moe_dir, untrained_model_dir):
    full = load_model(str(moe_dir), finetuning_type="full", device="cpu", freeze_gate=True)
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{i}.mlp.gate.weight" for i in range(full.config.num_hidden_layers)}
    lora = load_model(str(moe_dir), finetuning_type="lora", lora_rank=4, device="cpu", freeze_gate=True)
    assert not any("mlp.gate" in n for n, p in lora.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match=r"freeze_gate needs a mixture-of-experts model .*LlamaForCausalLM"):
        load_model(str(untrained_model_dir), finetuning_type="full", device="cpu", freeze_gate=True)


def test_lora_all_never_targets_a_router_unless_named():
    class TopKGate(nn.Module):  # a router built from a linear layer (LLaMA-MoE, JetMoE style)
        def __init__(self):
            super().__init__()
            self.wg = nn.Linear(8, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.gate, self.lm_head = nn.Linear(8, 8), TopKGate(), nn.Linear(8, 16)

    block = Block()
    assert find_router_modules(block) == ["gate"]
    assert _resolve_lora_targets(block, "all") == ["q_proj"]
    assert _resolve_lora_targets(block, "q_proj,wg") == ["q_proj", "wg"]


# ------------------------------------------------------------------------------------------------ config-time errors


def _params(demo_dir, model_dir, tmp_path, **kw):
    flat = {
        "model_name_or_path": str(model_dir),
        "finetuning_type": "full",
        "dataset": "arith_train,reverse_train",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 64,
        "output_dir": str(tmp_path / "out"),
        "train_type": "dynamic_mix",
        "component_name": "dynamic_moe",
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 1,
    }
    return flat_to_grouped({**flat, **kw})


def test_bad_inputs_are_one_line_config_errors(demo_dir, moe_dir, untrained_model_dir, tmp_path):
    validate_params(_params(demo_dir, moe_dir, tmp_path, mixer_eval_dataset="arith_dev,reverse_dev", freeze_gate=True))
    cases = [
        (dict(model=untrained_model_dir), r"mixer 'dynamic_moe' needs a mixture-of-experts model .* has none"),
        (dict(model=untrained_model_dir, component_name="random", freeze_gate=True), "freeze_gate needs a mixture"),
        (dict(mixer_eval_dataset="arith_dev,nope_dev"), "mixer_eval_dataset: dataset 'nope_dev' is not in"),
        (dict(mixer_eval_dataset="arith_dev"), "mixer_eval_dataset names 1 set.* but dataset has 2 domains"),
        (dict(components={"mixers": {"dynamic_moe": {"params": {"eta": 0}}}}), "eta must be > 0"),
        (dict(components={"mixers": {"dynamic_moe": {"params": {"c": 2}}}}), r"c must be in \[0, 1\]"),
    ]
    for kw, match in cases:
        model = kw.pop("model", moe_dir)
        with pytest.raises(ConfigError, match=match) as err:
            validate_params(_params(demo_dir, model, tmp_path, **kw))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        check_router(str(untrained_model_dir), "freeze_gate")


def test_cli_builds_a_tiny_moe(demo_dir, tmp_path):
    from dataflex.cli import build_parser, main

    assert build_parser().parse_args(["make-tiny-model", "--output", "x"]).arch == "llama"
    out = tmp_path / "moe"
    argv = ["make-tiny-model", "--output", str(out), "--data", str(demo_dir), "--size", "test", "--arch", "moe"]
    assert main([*argv, "--steps", "0"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert json.loads((out / "dataflex_tiny.json").read_text())["arch"] == "moe"


def test_the_data_checks_of_the_mix_mode(demo_dir, moe_dir, tmp_path):
    """What the data-processing node checks before it saves the pool, and the sets' hand-over to the mixer."""
    from dataflex.config import RunConfig
    from dataflex.train.modes.mix import check_mixer_data, mixer_eval_datasets

    cfg = RunConfig.from_params(_params(demo_dir, moe_dir, tmp_path))
    with pytest.raises(ConfigError, match="domain 'reverse_train' has 30 rows, too few to split off eval_samples=1000"):
        check_mixer_data(cfg, {"arith_train": 3000, "reverse_train": 30})
    with_sets = RunConfig.from_params(_params(demo_dir, moe_dir, tmp_path, mixer_eval_dataset="arith_dev,reverse_dev"))
    check_mixer_data(with_sets, {"arith_train": 3000, "reverse_train": 30})  # nothing is split off
    names = ["arith_train", "reverse_train"]
    assert mixer_eval_datasets(cfg.dataflex, names, None) is None
    sets = {"arith_dev": "A", "reverse_dev": "R"}
    assert mixer_eval_datasets(with_sets.dataflex, names, sets) == {"arith_train": "A", "reverse_train": "R"}
    with pytest.raises(ConfigError, match="mixer_eval_dataset set.s. reverse_dev were not built"):
        mixer_eval_datasets(with_sets.dataflex, names, {"arith_dev": "A"})
