"""Weighters in training: scale consistency with static training, step-level normalisation across accumulation,
the seed's custom weighter, ADAPT, resume, and bad weighter output.
(The formulas and config checks are in tests/unit/test_weighters_formulas.py.)"""

from __future__ import annotations

import pytest
import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.data import DataCollatorForCausalLM
from dataflex.models import load_model
from dataflex.train.trainer import Callback, Trainer, TrainingArguments, WeightedLoss
from dataflex.train.trainer.losses import WeighterError
from dataflex.train.weighter import StepWeighter, Weighter
from dataflex.train.weighter.adapt_weighter import position_weighted_embedding


def _lora(model_dir, seed=0, dropout=0.0):
    return load_model(
        str(model_dir), finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=dropout, dtype="fp32", seed=seed
    )


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        max_steps=4,
        seed=3,
        logging_steps=2,
        progress_bar=False,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _weighting(weighter, warmup=0, name="weighter", extra=None):
    """The run core's wiring of a weighter: its loss strategy, and the weighter as a callback."""
    return {"loss": WeightedLoss(weighter, warmup, name), "callbacks": {"weighter": weighter, **(extra or {})}}


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Uniform(StepWeighter):
    def compute_weights(self, scores, ctx):
        return torch.full_like(scores, 3.0)  # any constant: relative weights are normalised to mean 1


@pytest.mark.parametrize("ga", [1, 2])
def test_uniform_weights_reproduce_static_training(ga, tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """No scale jump at warmup_step: uniform weights give exactly the standard loss, hence the same weights."""
    collate = DataCollatorForCausalLM(tokenizer)
    static = _lora(tiny_model_dir)
    Trainer(static, sft_pool, _args(tmp_path / "s", gradient_accumulation_steps=ga), data_collator=collate).train()
    weighted = _lora(tiny_model_dir)
    result = Trainer(
        weighted,
        sft_pool,
        _args(tmp_path / "w", gradient_accumulation_steps=ga),
        data_collator=collate,
        **_weighting(Uniform(), 2),
    ).train()
    for name, value in _weights(static).items():
        torch.testing.assert_close(weighted.get_parameter(name).detach(), value, rtol=0, atol=1e-7)
    logged = [h for h in result.log_history if "weights/min" in h]
    assert (
        logged
        and logged[-1]["weights/min"] == pytest.approx(1.0)
        and logged[-1]["weights/entropy"] == pytest.approx(1.0)
    )


def test_weights_are_normalised_over_the_whole_step(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """2 micro-batches of 2 == 1 micro-batch of 4: the loss weighter sees all 4 losses of the step at once."""
    collate = DataCollatorForCausalLM(tokenizer)
    runs = []
    for batch, ga in ((4, 1), (2, 2)):
        model = _lora(tiny_model_dir)
        weighter = REGISTRY.build("weighter", "loss", cfg={"strategy": "linupper", "delta": 2.0})
        args = _args(
            tmp_path / f"{batch}x{ga}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            disable_shuffling=True,
            max_steps=3,
        )
        Trainer(model, sft_pool, args, data_collator=collate, **_weighting(weighter)).train()
        runs.append((model, weighter))
    (m1, w1), (m2, w2) = runs
    torch.testing.assert_close(w1._weights, w2._weights, rtol=1e-5, atol=1e-6)
    assert w1._weights.numel() == 4 and float(w1._weights.std()) > 0
    # Same step losses and weights; Adam amplifies float rounding of near-zero gradient entries, hence atol.
    for name, value in _weights(m1).items():
        torch.testing.assert_close(m2.get_parameter(name).detach(), value, rtol=0, atol=2e-4)


def test_seed_custom_weighter_runs_verbatim(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    weighter = REGISTRY.build("weighter", "custom", runtime={"accelerator": None}, cfg={"strategy": "uniform"})
    seen = []
    orig = weighter.get_weighted_loss

    def spy(losses, **kw):
        seen.append((kw["ctx"].global_step, losses.shape[0]))
        return orig(losses, **kw)

    weighter.get_weighted_loss = spy
    Trainer(
        _lora(tiny_model_dir),
        sft_pool,
        _args(tmp_path, gradient_accumulation_steps=2),
        data_collator=DataCollatorForCausalLM(tokenizer),
        **_weighting(weighter, 1),
    ).train()
    assert seen == [(1, 4), (1, 4), (2, 4), (2, 4), (3, 4), (3, 4)]


def test_adapt_weighter(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    collate = DataCollatorForCausalLM(tokenizer)
    anchors = sft_pool.select(range(0, 10))
    w = REGISTRY.build(
        "weighter",
        "adapt",
        runtime={"eval_dataset": anchors, "data_collator": collate},
        cfg={"tau": 0.1, "refresh_interval": 2, "anchor_batch_size": 4},
    )
    result = Trainer(
        _lora(tiny_model_dir),
        sft_pool,
        _args(tmp_path, max_steps=4, gradient_accumulation_steps=2),
        data_collator=collate,
        **_weighting(w),
    ).train()
    assert w.anchor_step == 2 and w.anchor_mean.shape == (64,)
    assert any("weights/max" in h for h in result.log_history)
    # embedding: later tokens weigh more, padding none, unit norm
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    emb = position_weighted_embedding(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(emb, torch.nn.functional.normalize(torch.tensor([[1 / 3, 2 / 3]]), dim=-1))
    with pytest.raises(ConfigError, match="needs an eval_dataset"):
        REGISTRY.build("weighter", "adapt", runtime={"eval_dataset": None, "data_collator": collate})


@pytest.mark.parametrize("name, cfg", [("loss", {"strategy": "extremes"}), ("adapt", {"refresh_interval": 3})])
def test_resume_equals_uninterrupted(name, cfg, tmp_path, tiny_model_dir, sft_pool, tokenizer):
    collate = DataCollatorForCausalLM(tokenizer)
    runtime = {"eval_dataset": sft_pool.select(range(6)), "data_collator": collate}

    def run(out, resume=None, observers=None):
        model = _lora(tiny_model_dir, dropout=0.1)
        args = _args(
            out,
            max_steps=6,
            gradient_accumulation_steps=2,
            save_steps=4 if resume is None else 0,
            resume_from_checkpoint=resume,
        )
        w = REGISTRY.build("weighter", name, runtime=runtime, cfg=cfg)
        trainer = Trainer(model, sft_pool, args, data_collator=collate, **_weighting(w, 1, extra=observers))
        return model, trainer.train()

    full_model, full = run(tmp_path / "a")

    class Kill(Callback):
        def on_step_end(self, ctx, logs):
            if ctx.global_step == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", observers={"kill": Kill()})
    resumed_model, resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "out" / "checkpoints" / "checkpoint-4"))
    for n, v in _weights(full_model).items():
        assert (resumed_model.get_parameter(n).detach() - v).abs().max() <= 1e-6, n
    for a, b in zip(full.log_history, resumed.log_history, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a if "second" not in k)


class Broken(Weighter):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def get_weighted_loss(self, losses, *, ctx=None, model=None, inputs=None):
        if self.mode == "vector":
            return losses
        if self.mode == "nan":
            return losses.sum() * float("nan")
        return -losses.sum()


@pytest.mark.parametrize("mode, match", [("vector", "not a scalar"), ("nan", "non-finite"), ("negative", "negative")])
def test_bad_weighter_output_names_weighter_and_step(mode, match, tmp_path, tiny_model_dir, sft_pool, tokenizer):
    with pytest.raises(
        WeighterError, match=f"weighter 'broken' at step 1 .*{match}|weighter 'broken' at step 1 returned"
    ):
        Trainer(
            _lora(tiny_model_dir),
            sft_pool,
            _args(tmp_path),
            data_collator=DataCollatorForCausalLM(tokenizer),
            **_weighting(Broken(mode), 1, "broken"),
        ).train()


@pytest.mark.parametrize("normalize", ["none", "mean_one"])
def test_adapt_normalize_absolute_or_relative_weights(normalize, tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """ADAPT's first step by hand: w = sigmoid(<phi(x), A> / tau). `none` (DataFlex's absolute weights): loss =
    mean_b w_b * mean-loss_b; `mean_one`: m = w / mean(w) on each row's token-sum loss over the step's tokens."""
    from dataflex.features.token_losses import count_supervised_tokens, per_token_losses

    collate = DataCollatorForCausalLM(tokenizer)
    anchors = sft_pool.select(range(20, 28))
    cfg = {"tau": 0.5, "anchor_batch_size": 4, "normalize": normalize}
    w = REGISTRY.build("weighter", "adapt", runtime={"eval_dataset": anchors, "data_collator": collate}, cfg=cfg)
    model = _lora(tiny_model_dir)
    batch = collate([{k: sft_pool[i][k] for k in ("input_ids", "labels")} for i in range(4)])
    with torch.no_grad():  # the expected value, from the untrained model (the step's pre-pass sees it)
        rows = anchors.select_columns(["input_ids", "labels"])
        anchor = torch.cat([w.embed(model, collate([rows[i] for i in range(s, s + 4)])) for s in (0, 4)]).mean(0)
        weights = torch.sigmoid(w.embed(model, batch) @ anchor / 0.5)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tok = per_token_losses(logits, batch["labels"])
        counts = count_supervised_tokens(batch["labels"]).float()
    if normalize == "none":
        expected = (weights * tok.sum(1) / counts).mean()
    else:
        expected = (weights / weights.mean() * tok.sum(1)).sum() / counts.sum()
    args = _args(tmp_path, max_steps=1, logging_steps=1, disable_shuffling=True)
    result = Trainer(model, sft_pool, args, data_collator=collate, **_weighting(w)).train()
    assert result.log_history[0]["weighted_loss"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ConfigError, match="normalize must be one of"):
        REGISTRY.check("weighter", "adapt", {"normalize": "sum"})
