"""The one training loop: HF-Trainer-equal loss and updates, gradient accumulation, resume equality, TrainState.
(Plan arithmetic and argument checks are in tests/unit/test_trainer_config.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dataflex.core.errors import CheckpointError
from dataflex.data import DataCollatorForCausalLM
from dataflex.models import load_model
from dataflex.train.trainer import Callback, LossStrategy, MicroBatchLosses, Trainer, TrainingArguments, forward_losses
from dataflex.train.trainer.state import read_manifest


def _lora(model_dir, seed=0, dropout=0.0, target="all"):
    return load_model(
        str(model_dir),
        finetuning_type="lora",
        lora_target=target,
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=dropout,
        dtype="fp32",
        seed=seed,
    )


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        max_steps=6,
        seed=3,
        logging_steps=2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.01,
        progress_bar=False,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_micro_batch_loss_equals_hf_compute_loss(tiny_model_dir, sft_pool, tokenizer):
    """Per-sample losses computed once reproduce HF's num_items_in_batch-normalised loss, micro-batch by micro-batch."""
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    model = _lora(tiny_model_dir)
    collate = DataCollatorForCausalLM(tokenizer)
    rows = [sft_pool[i] for i in (0, 1, 50, 51, 70)]  # two domains, different lengths
    micro = [collate(rows[:3]), collate(rows[3:])]
    hf = HFTrainer(model=model, args=HFArgs(output_dir="/tmp/unused", report_to=[], use_cpu=True))
    hf_micro = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")} for b in micro]
    _, n_items = hf.get_batch_samples(iter(hf_micro), len(hf_micro), torch.device("cpu"))
    window = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    assert window == int(n_items)
    for ours_b, hf_b in zip(micro, hf_micro):
        ours = forward_losses(model, ours_b, window_tokens=window).standard_loss()
        theirs = hf.compute_loss(model, hf_b, num_items_in_batch=n_items)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_training_equals_hf_trainer(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """Same data order, optimizer, schedule, clipping and accumulation: same final weights as transformers.Trainer."""
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    pool = sft_pool.select(range(0, 80, 2))
    collate = DataCollatorForCausalLM(tokenizer)
    ours_model = _lora(tiny_model_dir)
    args = _args(tmp_path, disable_shuffling=True, max_steps=4)
    result = Trainer(ours_model, pool, args, data_collator=collate).train()

    hf_model = _lora(tiny_model_dir)
    hf_args = HFArgs(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        max_steps=4,
        seed=3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.01,
        report_to=[],
        use_cpu=True,
        train_sampling_strategy="sequential",
        logging_steps=2,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )

    def hf_collate(rows):
        batch = collate(rows)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    hf_result = HFTrainer(model=hf_model, args=hf_args, train_dataset=pool, data_collator=hf_collate).train()
    ours, theirs = _trainable(ours_model), _trainable(hf_model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    assert math.isclose(result.train_loss_mean, hf_result.training_loss, rel_tol=1e-5)


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """Stop at a checkpoint, resume in a fresh process state: same final weights (fp32 CPU, <= 1e-6)."""
    collate = DataCollatorForCausalLM(tokenizer)
    full_model = _lora(tiny_model_dir, dropout=0.1)  # dropout: the RNG state must be restored too
    full = Trainer(full_model, sft_pool, _args(tmp_path / "a"), data_collator=collate).train()

    # Interrupted run: same config, stopped after step 3 (its checkpoint), then resumed from it.
    part_model = _lora(tiny_model_dir, dropout=0.1)
    part_args = _args(tmp_path / "b", save_steps=3)

    class Kill(Callback):  # the process dies during step 4, after the step-3 checkpoint
        def on_step_end(self, ctx, logs):
            if ctx.global_step == 4:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(part_model, sft_pool, part_args, data_collator=collate, callbacks={"kill": Kill()}).train()
    ckpt = tmp_path / "b" / "out" / "checkpoints" / "checkpoint-3"
    assert read_manifest(ckpt)["trainable"]

    torch.manual_seed(12345)  # a different global RNG state: the checkpoint's must win
    resumed_model = _lora(tiny_model_dir, dropout=0.1, seed=99)  # other init: the checkpoint's weights must win
    resumed = Trainer(
        resumed_model, sft_pool, _args(tmp_path / "b", resume_from_checkpoint=str(ckpt)), data_collator=collate
    ).train()
    assert resumed.global_step == full.global_step == 6
    a, b = _trainable(full_model), _trainable(resumed_model)
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
    assert resumed.final_train_loss == pytest.approx(full.final_train_loss, abs=1e-6)
    for ours, theirs in zip(resumed.log_history, full.log_history, strict=True):
        assert ours["step"] == theirs["step"] and ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6)


def test_latest_resume_and_checkpoint_errors(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    collate = DataCollatorForCausalLM(tokenizer)
    args = _args(tmp_path, save_steps=2, save_total_limit=2, max_steps=4)
    Trainer(_lora(tiny_model_dir), sft_pool, args, data_collator=collate).train()
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    # resume "latest" on a finished run trains nothing more
    done = Trainer(
        _lora(tiny_model_dir),
        sft_pool,
        _args(tmp_path, max_steps=4, resume_from_checkpoint="latest"),
        data_collator=collate,
    ).train()
    assert done.global_step == 4

    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-4"
    with pytest.raises(CheckpointError, match="another model"):
        Trainer(
            _lora(tiny_model_dir, target="q_proj,v_proj"),
            sft_pool,
            _args(tmp_path, resume_from_checkpoint=str(ckpt)),
            data_collator=collate,
        )
    (ckpt / "optimizer.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="corrupt: optimizer.safetensors"):
        Trainer(
            _lora(tiny_model_dir), sft_pool, _args(tmp_path, resume_from_checkpoint=str(ckpt)), data_collator=collate
        )
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="truncated or not a dataflex checkpoint"):
        read_manifest(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")


def test_logs_per_domain_and_metrics_sink(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    seen = []
    result = Trainer(
        _lora(tiny_model_dir),
        sft_pool,
        _args(tmp_path, max_steps=4),
        data_collator=DataCollatorForCausalLM(tokenizer),
        domain_names=["arith", "reverse", "sort"],
        metrics_sink=lambda m, s: seen.append((s, m)),
    ).train()
    assert [s for s, _ in seen] == [2, 4]
    logs = seen[-1][1]
    assert {"loss", "learning_rate", "tokens_per_second", "grad_norm", "epoch"} <= logs.keys()
    assert any(k.startswith("train_loss/") for k in logs)
    assert result.train_samples_seen == 4 * 2 * 4
    json.dumps(result.to_dict())


def test_weighting_hook_sees_per_sample_losses(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """A loss strategy gets per-sample losses once per micro-batch; uniform token weights reproduce the default."""
    calls = []

    class Hook(LossStrategy):
        def loss(self, losses: MicroBatchLosses, ctx, model, inputs):
            calls.append((ctx.global_step, ctx.micro_step, losses.per_sample_loss.shape[0]))
            return (losses.token_loss_sum * 1.0).sum() * losses.num_processes / losses.window_tokens

    collate = DataCollatorForCausalLM(tokenizer)
    m1, m2 = _lora(tiny_model_dir), _lora(tiny_model_dir)
    Trainer(m1, sft_pool, _args(tmp_path / "a", max_steps=2), data_collator=collate).train()
    Trainer(m2, sft_pool, _args(tmp_path / "b", max_steps=2), data_collator=collate, loss=Hook()).train()
    assert calls == [(0, 0, 4), (0, 1, 4), (1, 0, 4), (1, 1, 4)]
    for name, value in _trainable(m1).items():
        torch.testing.assert_close(value, _trainable(m2)[name], rtol=0, atol=0)


def test_bf16_mixed_precision_after_fp32_in_one_process(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """bf16 autocast works on CPU, and a second run in the same process may change precision."""
    collate = DataCollatorForCausalLM(tokenizer)
    fp32 = Trainer(
        _lora(tiny_model_dir), sft_pool, _args(tmp_path / "a", max_steps=2, logging_steps=1), data_collator=collate
    ).train()
    bf16 = Trainer(
        _lora(tiny_model_dir),
        sft_pool,
        _args(tmp_path / "b", max_steps=2, logging_steps=1, mixed_precision="bf16"),
        data_collator=collate,
    ).train()
    for a, b in zip(fp32.log_history, bf16.log_history):
        assert math.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 0.1


def test_a_run_of_many_passes_over_its_pool_says_so_once(tmp_path, tiny_model_dir, sft_pool, tokenizer, caplog):
    """max_steps far beyond the pool: one notice with the implied passes and a time estimate after the first step."""
    import logging

    small = sft_pool.select(range(4))  # one step per pass at batch 4
    with caplog.at_level(logging.INFO, logger="dataflex"):
        Trainer(
            _lora(tiny_model_dir),
            small,
            _args(tmp_path, max_steps=24),
            data_collator=DataCollatorForCausalLM(tokenizer),
        ).train()
    notices = [r.getMessage() for r in caplog.records if "passes over this pool" in r.getMessage()]
    assert len(notices) == 1 and notices[0].startswith("max_steps=24 is 24 passes over this pool; at ")
