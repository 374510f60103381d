"""Evaluation during training (eval_strategy), the best checkpoint and early stopping; and a run trained in
chained segments equals one call (the LESS warm-up trains epoch by epoch)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dataflex.config import RunConfig
from dataflex.core.errors import ConfigError
from dataflex.data import DataCollatorForCausalLM
from dataflex.models import load_model
from dataflex.train import run
from dataflex.train.trainer import Trainer, TrainingArguments


def _cfg(model_dir, tmp_path, **train):
    model = {"model_name_or_path": str(model_dir), "lora_rank": 4, "lora_target": "all"}
    base = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_steps": 20,
        "logging_steps": 2,
        "progress_bar": False,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "per_device_eval_batch_size": 8,
    }
    return RunConfig.from_params({"model": model, "train": {**base, **train}})


def _evals(sft_pool):
    return {"dev_a": sft_pool.select(range(8)), "dev_b": sft_pool.select(range(8, 16))}


def test_eval_losses_are_recorded_at_each_evaluation(tiny_model_dir, sft_pool, tmp_path):
    summary = run.train(_cfg(tiny_model_dir, tmp_path, max_steps=6), sft_pool, "static", eval_sets=_evals(sft_pool))
    evals = [h for h in summary["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4, 6]
    for h in evals:
        assert h["eval_loss"] == pytest.approx((h["eval_dev_a_loss"] + h["eval_dev_b_loss"]) / 2)
    assert summary["best_step"] in (2, 4, 6) and summary["stopped_early_at"] is None
    assert summary["best_metric"] == min(h["eval_loss"] for h in evals)


def test_early_stopping_stops_keeps_the_best_and_a_resume_stays_stopped(tiny_model_dir, sft_pool, tmp_path):
    """min_delta so large that no evaluation after the first improves: with patience 2 the run stops at step 6 of
    20, the best checkpoint is step 2's, and load_best_model_at_end saves that model."""
    cfg = _cfg(
        tiny_model_dir,
        tmp_path,
        early_stopping_steps=2,
        early_stopping_min_delta=100.0,
        load_best_model_at_end=True,
        save_steps=4,
    )
    summary = run.train(cfg, sft_pool, "static", eval_sets=_evals(sft_pool))
    assert summary["global_step"] == 6 and summary["stopped_early_at"] == 6 and summary["best_step"] == 2
    best = tmp_path / "out" / "best"
    assert json.loads((best / "trainer_state.json").read_text())["global_step"] == 2
    saved = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    trainable = load_file(str(best / "trainable.safetensors"))
    assert len(saved) == len(trainable)
    for name, tensor in trainable.items():  # peft drops the adapter name from the saved keys
        key = name.replace("base_model.model.", "base_model.model.", 1).replace(".default", "")
        assert torch.equal(saved[key], tensor), name
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-6").is_dir(), "a checkpoint at the stop step"

    resumed = run.train(
        RunConfig.from_params(
            {**cfg.to_params(), "train": {**cfg.train.to_dict(), "resume_from_checkpoint": "latest"}}
        ),
        sft_pool,
        "static",
        eval_sets=_evals(sft_pool),
    )
    assert resumed["global_step"] == 6 and resumed["stopped_early_at"] == 6, "a stopped run stays stopped"


def test_evaluation_needs_eval_sets(tiny_model_dir, sft_pool, tmp_path):
    with pytest.raises(ConfigError, match="needs eval sets"):
        run.train(_cfg(tiny_model_dir, tmp_path), sft_pool, "static", eval_sets=None)
    with pytest.raises(ConfigError, match="need evaluations during training"):
        _cfg(tiny_model_dir, tmp_path, eval_strategy="no", early_stopping_steps=2)
    from dataflex.config import validate

    cfg = RunConfig.from_params(
        {**_cfg(tiny_model_dir, tmp_path).to_params(), "data": {"dataset": "a", "eval_dataset": "b"}}
    )
    for pipeline in ("less", "static_select", "doremi"):
        with pytest.raises(ConfigError, match=f"not supported in the {pipeline} pipeline"):
            validate(cfg, check_paths=False, pipelines=(pipeline,))


def test_epochs_chained_in_one_trainer_equal_one_call_with_dropout(tiny_model_dir, sft_pool, tokenizer, tmp_path):
    """The LESS warm-up trains epoch by epoch on one Trainer: with lora_dropout 0.1 the dropout stream must run on
    (the loop seeds once per run), so 4 chained calls equal one call."""
    pool = sft_pool.select(range(24))
    collate = DataCollatorForCausalLM(tokenizer)

    def trainer(out):
        model = load_model(str(tiny_model_dir), lora_rank=4, lora_dropout=0.1, seed=0)
        args = TrainingArguments(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=4,
            num_train_epochs=4.0,
            learning_rate=5e-3,
            logging_steps=1,
            progress_bar=False,
        )
        return model, Trainer(model, pool, args, data_collator=collate)

    one_model, one = trainer("one")
    one.train()
    chained_model, chained = trainer("chained")
    per_epoch = chained.plan.steps_per_epoch
    for epoch in range(1, 5):
        chained.train(until_step=epoch * per_epoch)
    assert chained.global_step == one.global_step == 4 * per_epoch
    a = {n: p for n, p in one_model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in chained_model.named_parameters() if p.requires_grad}
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_early_stopping_ends_a_dynamic_select_run_cleanly(tiny_model_dir, sft_pool, tmp_path):
    """Rounds after the stop carry the stopped state: no more selections, the summary is the stop's."""
    from dataflex.train.modes import select

    cfg = _cfg(tiny_model_dir, tmp_path, max_steps=-1, early_stopping_steps=1, early_stopping_min_delta=100.0)
    flex = {"train_type": "dynamic_select", "component_name": "random", "warmup_step": 2, "update_step": 2}
    cfg = RunConfig.from_params({**cfg.to_params(), "dataflex": {**flex, "update_times": 3}})
    result = select.run_all(cfg, sft_pool, _evals(sft_pool))
    assert result["global_step"] == 4 and result["stopped_early_at"] == 4 and result["best_step"] == 2
    assert [s["step"] for s in result["selection_history"]] == [2]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_early_stopping_ends_a_dynamic_mix_run_cleanly(tiny_model_dir, sft_pool, tmp_path):
    from dataflex.train.modes import mix

    cfg = _cfg(tiny_model_dir, tmp_path, max_steps=-1, early_stopping_steps=1, early_stopping_min_delta=100.0)
    flex = {"train_type": "dynamic_mix", "component_name": "random", "warmup_step": 2, "update_step": 2}
    cfg = RunConfig.from_params({**cfg.to_params(), "dataflex": {**flex, "update_times": 3}})
    result = mix.run_all(cfg, sft_pool, eval_sets=_evals(sft_pool))
    assert result["global_step"] == 4 and result["stopped_early_at"] == 4
    assert [m["step"] for m in result["mixture_history"]] == [0, 2]  # the initial mix and the update at step 2
