"""Dynamic selection on the tiny model: caching and resume, a broken selector's error, online LESS.
(The schedule and each selector's math are in tests/unit/test_select_schedule.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import lora_model_params, train_params
from safetensors.torch import load_file

from dataflex.config import DEFAULTS, RunConfig
from dataflex.train.modes import select
from dataflex.train.run import load_checkpoint_model


def _setup(demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer, component="random", params=None, **flex_kw):
    from dataflex.data import build_dataset

    evals = {
        "arith_dev": build_dataset(
            dataset=["arith_dev"],
            dataset_dir=demo_dir,
            tokenizer=tokenizer,
            template="default",
            cutoff_len=64,
            stage="sft",
        )
    }
    model = lora_model_params(tiny_model_dir)
    train = train_params(tmp_path / "out")
    comps = {"selectors": {component: {"name": component, "params": params or {}}}}
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": component,
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        "components": comps,
        **flex_kw,
    }
    return evals, RunConfig.from_params({"model": model, "train": train, "dataflex": flex})


def _with(cfg, **groups):
    """`cfg` with some keys of some groups changed, e.g. _with(cfg, train={"output_dir": ...})."""
    return RunConfig.from_params({**cfg.to_params(), **{g: {**cfg.to_params()[g], **kv} for g, kv in groups.items()}})


def test_rounds_cache_and_resume_from_a_save_steps_checkpoint(demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer):
    evals, cfg = _setup(
        demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer, "loss", {"focus": "high", "replacement": False}
    )
    cfg = _with(cfg, train={"save_steps": 3})
    result = select.run_all(cfg, sft_pool, evals)
    assert result["global_step"] == 6 and [h["step"] for h in result["selection_history"]] == [2, 4]
    assert all(sum(h["domain_counts"].values()) == 8 for h in result["selection_history"])
    uninterrupted = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))

    # Same config again: every selection (and the losses behind it) is a cache hit.
    state = {"round": 0, "checkpoint": str(tmp_path / "out" / "checkpoints" / "checkpoint-2")}
    feats, sel1 = select.select_round(cfg, sft_pool, evals, state)
    assert feats["features"]["cache_hit"] and sel1["cache"] == "hit"
    other = _with(cfg, dataflex={"components": {"selectors": {"loss": {"name": "loss", "params": {"focus": "low"}}}}})
    assert select.select_round(other, sft_pool, evals, state)[1]["cache"] == "miss"

    # Resume from the save_steps checkpoint in the middle of round 1 (step 3): the plan restores the active
    # selection and position, and the finished run equals the uninterrupted one.
    mid = {"round": 0, "checkpoint": str(tmp_path / "out" / "checkpoints" / "checkpoint-3")}
    cfg2 = _with(cfg, train={"output_dir": str(tmp_path / "resumed")})
    s1 = select.train_segment(cfg2, sft_pool, evals, 1, previous=mid, selection=sel1)
    _, sel2 = select.select_round(cfg2, sft_pool, evals, s1)
    first_run = json.loads((tmp_path / "out" / "selections" / "step_4.json").read_text())
    assert sel2["step"] == 4 and sel2["indices"] == first_run["indices"]
    s2 = select.train_segment(cfg2, sft_pool, evals, 2, previous=s1, selection=sel2)
    select.finalize(s2, [sel1, sel2])
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-6) for k in resumed)


class _Bad:
    """A selector returning a broken selection."""

    def __init__(self, how: str) -> None:
        self.how = how


@pytest.mark.parametrize(
    "how, message",
    [
        ("short", "returned 7 indices; it must return exactly num_samples=8"),
        ("range", "returned index 120, outside the pool"),
        ("type", "returned str, not a list of pool indices"),
    ],
)
def test_a_broken_selection_is_a_clear_error(demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer, how, message):
    from dataflex.core.registry import register_selector
    from dataflex.train.selector.base_selector import Selector

    @register_selector(f"broken_{how}")
    class Broken(Selector):
        def __init__(self, dataset, accelerator, data_collator, cache_dir=None):
            super().__init__(dataset, accelerator, data_collator, cache_dir)

        def select(self, model, step_id, num_samples, **kwargs):
            if how == "short":
                return list(range(num_samples - 1))
            if how == "range":
                return [len(self.dataset)] * num_samples
            return "0,1,2"

    evals, cfg = _setup(demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer, f"broken_{how}")
    state = select.train_segment(cfg, sft_pool, evals, 0)
    with pytest.raises(select.SelectionError, match=re.escape(f"selector 'broken_{how}' at step 2 {message}")):
        select.select_round(cfg, sft_pool, evals, state)


def test_online_less_picks_the_target_domain_and_beats_random_on_it(
    demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer
):
    """Issue #4's end-to-end claim on the demo: with arith_dev as the target, `less` selects mostly arith from
    the first selection on, and after the same number of steps its held-out arith loss is lower than `random`'s."""
    from dataflex.data import DataCollatorForCausalLM, build_dataset
    from dataflex.evaluation import eval_loss

    held_out = build_dataset(
        dataset=["arith_test"],
        dataset_dir=demo_dir,
        tokenizer=tokenizer,
        template="default",
        cutoff_len=64,
        stage="sft",
    )
    base_rate = sum(d == 0 for d in sft_pool["domain_id"]) / len(sft_pool)  # arith is domain 0 of the pool
    losses = {}
    for name, params in (("less", {"proj_dim": 2048, "batch_size": 8}), ("random", {})):
        evals, cfg = _setup(
            demo_dir, tiny_model_dir, sft_pool, tmp_path / name, tokenizer, name, params, warmup_step=2, update_step=4
        )
        result = select.run_all(cfg, sft_pool, evals)
        fractions = [
            h["domain_counts"]["arith_train"] / sum(h["domain_counts"].values()) for h in result["selection_history"]
        ]
        if name == "less":
            assert len(fractions) == 2 and min(fractions) >= 0.75 > base_rate + 0.3, fractions
        net = load_checkpoint_model(cfg.model, result["last_checkpoint"], cfg.train.seed)
        losses[name] = eval_loss(net, held_out, DataCollatorForCausalLM(tokenizer), 8)["loss"]
    assert losses["less"] < losses["random"] - 0.02, losses


def test_less_exclude_selected_never_repeats_in_a_flex_epoch_and_resumes_exactly(
    demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer
):
    """Issue #16: with exclude_selected the two selections of a flex epoch are disjoint; the memory rides in the
    TrainState, so a run resumed from a checkpoint between them selects what the uninterrupted run selected."""
    params = {"proj_dim": 256, "batch_size": 16, "exclude_selected": True, "cache_dir": str(tmp_path / "cache")}
    evals, cfg = _setup(demo_dir, tiny_model_dir, sft_pool, tmp_path, tokenizer, "less", params)
    cfg = _with(cfg, train={"save_steps": 3})
    result = select.run_all(cfg, sft_pool, evals)
    assert [h["step"] for h in result["selection_history"]] == [2, 4]
    first, second = (json.loads((tmp_path / "out" / "selections" / f"step_{s}.json").read_text()) for s in (2, 4))
    assert not set(first["indices"]) & set(second["indices"])
    assert second["selector_state"] == {
        "selected_flex_epoch": 0,
        "selected_rows": sorted(first["indices"] + second["indices"]),
    }

    mid = {"round": 0, "checkpoint": str(tmp_path / "out" / "checkpoints" / "checkpoint-3")}
    cfg2 = _with(cfg, train={"output_dir": str(tmp_path / "resumed")})
    s1 = select.train_segment(cfg2, sft_pool, evals, 1, previous=mid, selection=first)
    _, resumed = select.select_round(cfg2, sft_pool, evals, s1)
    assert resumed["indices"] == second["indices"] and resumed["selector_state"] == second["selector_state"]
