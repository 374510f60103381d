"""Mixing on the tiny model: a trainer on a mixture resumes exactly, chained rounds equal one run, and
DoReMi's excess loss and weighted proxy loss. (The sampling core and formulas are in tests/unit/test_mixing.py.)"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from dataflex.config import RunConfig
from dataflex.core.registry import REGISTRY
from dataflex.data import DataCollatorForCausalLM
from dataflex.models import load_model
from dataflex.train.dataset.mixed_proportion_manager import MixedProportionManager
from dataflex.train.modes import mix
from dataflex.train.trainer import Callback, Trainer, TrainingArguments
from dataflex.train.trainer.plan import MixturePlan


def test_trainer_on_a_mixture_resumes_exactly(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    from dataflex.data import domain_names

    names = domain_names(sft_pool)
    ids = sft_pool["domain_id"]
    sizes = [sum(1 for d in ids if d == k) for k in range(len(names))]
    offsets = [int(np.sum(sizes[:k])) for k in range(len(names))]
    collate = DataCollatorForCausalLM(tokenizer)

    def run(out, resume=None, stop=None):
        manager = MixedProportionManager(names, sizes, init_proportions=[0.6, 0.3, 0.1], seed=5)
        plan = MixturePlan(manager, offsets, 4, 2, num_steps=6)
        model = load_model(str(tiny_model_dir), finetuning_type="lora", lora_rank=4, seed=0)
        args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_steps=6,
            save_steps=3,
            logging_steps=3,
            progress_bar=False,
            resume_from_checkpoint=resume,
        )
        seen = []

        class Watch(Callback):
            def on_micro_batch(self, losses, ctx):
                seen.extend(losses.domain_id.tolist())

            def on_step_end(self, ctx, logs):
                if ctx.global_step == stop:
                    raise KeyboardInterrupt

        Trainer(model, sft_pool, args, data_collator=collate, plan=plan, callbacks={"watch": Watch()}).train()
        return model, seen

    full, seen = run(tmp_path / "a")
    counts = Counter(seen)  # 48 samples at 0.6 / 0.3 / 0.1: within one sample of 28.8 / 14.4 / 4.8
    assert all(abs(counts[d] - 48 * p) <= 1 for d, p in enumerate([0.6, 0.3, 0.1])), counts
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=4)
    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoints" / "checkpoint-3"))
    for name, p in full.named_parameters():
        if p.requires_grad:
            assert (p - resumed.get_parameter(name)).abs().max() <= 1e-6


def _mix_cfg(tmp_path, tiny_model_dir, **flex):
    model = {
        "model_name_or_path": str(tiny_model_dir),
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "dtype": "fp32",
    }
    train = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=-1,
        logging_steps=2,
        progress_bar=False,
    ).to_dict()
    base = {
        "train_type": "dynamic_mix",
        "component_name": "random",
        "components_cfg_file": None,
        "components": {"mixers": {"random": {"name": "random", "params": {"seed": 11}}}},
        "user_modules": [],
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        "train_step": 0,
        "static_mix": False,
        "mixture_sample_rule": "mixture",
        "init_mixture_proportions": [0.8, 0.1, 0.1],
    }
    base.update(flex)
    return RunConfig.from_params({"model": model, "train": train, "dataflex": base})


def test_rounds_chained_equal_one_run(tmp_path, tiny_model_dir, sft_pool, tokenizer):
    """warmup -> mix -> segment -> mix -> segment through checkpoints == one run that changes proportions in-loop."""
    cfg = _mix_cfg(tmp_path / "rounds", tiny_model_dir)
    state = mix.train_segment(cfg, sft_pool, 0)
    mixtures = []
    for k in (1, 2):
        mixtures.append(mix.compute_mixture(cfg, sft_pool, state))
        state = mix.train_segment(cfg, sft_pool, k, previous=state, mixture=mixtures[-1])
    result = mix.finalize(state, mixtures)
    assert result["global_step"] == 6 and [m["step"] for m in mixtures] == [2, 4]
    lines = result["mixture_history"]
    assert len(lines) == 3 and lines[0]["proportions"] == pytest.approx([0.8, 0.1, 0.1])

    # The same run in one Trainer, the mixer called in-loop at steps 2 and 4.
    manager, offsets = mix.build_manager(sft_pool, cfg.dataflex, seed=42)
    mixer = REGISTRY.build("mixer", "random", runtime={"mixture_manager": manager}, cfg={"seed": 11})

    class Mix(Callback):
        def on_step_end(self, ctx, logs):
            if ctx.global_step in (2, 4):
                manager.set_proportions(mixer.mix(None, ctx.global_step))

    model = load_model(str(tiny_model_dir), finetuning_type="lora", lora_rank=4, lora_alpha=8, seed=42)
    args = replace(cfg.train, output_dir=str(tmp_path / "one"))
    Trainer(
        model,
        sft_pool,
        args,
        data_collator=DataCollatorForCausalLM(tokenizer),
        plan=MixturePlan(manager, offsets, 4, 1, num_steps=6),
        callbacks={"mix": Mix()},
    ).train()
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "rounds" / "out" / "adapter" / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    one = get_peft_model_state_dict(model)
    for key, value in adapter.items():
        assert (one[key] - value).abs().max() <= 1e-6, key


class _Ctx:
    def __init__(self, step):
        self.global_step = step
        self.accelerator = None


def test_doremi_excess_and_weighted_proxy_loss(tiny_model_dir, sft_pool, tokenizer):
    from dataflex.train.trainer import forward_losses

    manager = MixedProportionManager(["a", "b", "c"], [40, 40, 40])
    mixer = REGISTRY.build(
        "mixer",
        "doremi",
        runtime={"mixture_manager": manager},
        cfg={"reference_model_path": str(tiny_model_dir), "reweight_eta": 1.0},
    )
    proxy = load_model(str(tiny_model_dir), finetuning_type="lora", lora_rank=4, seed=0)
    with torch.no_grad():  # move the proxy away from the reference (the base model) so the excess is not all 0
        for name, p in proxy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    batch = DataCollatorForCausalLM(tokenizer)([sft_pool[i] for i in (0, 1, 45, 90)])
    window = int((batch["labels"][:, 1:] != -100).sum())
    losses = forward_losses(proxy, batch, window_tokens=window)
    standard = losses.standard_loss()
    assert torch.allclose(mixer.proxy_loss(losses, batch), standard)  # alpha = p: the standard loss
    with torch.no_grad(), proxy.disable_adapter():
        ref = proxy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # = the reference
    from dataflex.train.trainer.losses import per_token_losses

    mask = (batch["labels"][:, 1:] != -100).float()
    excess_rows = ((losses.token_losses.detach() - per_token_losses(ref, batch["labels"])).clamp(min=0) * mask).sum(1)
    dom = batch["domain_id"]
    expected = [float(excess_rows[dom == d].sum() / losses.token_count[dom == d].sum()) for d in range(3)]
    mixer.on_step_end(_Ctx(1), {})
    assert mixer.excess.tolist() == pytest.approx(expected, rel=1e-5)
    assert mixer.alpha.argmax() == int(np.argmax(expected)) and mixer.updates == 1

    # The proxy really trains on the weighted loss: other alpha, other loss and gradient.
    mixer.alpha = np.array([0.8, 0.1, 0.1])
    weighted = mixer.proxy_loss(losses, batch)
    assert not torch.allclose(weighted, standard)
    g_w = torch.autograd.grad(weighted, [p for p in proxy.parameters() if p.requires_grad], retain_graph=True)[0]
    g_s = torch.autograd.grad(standard, [p for p in proxy.parameters() if p.requires_grad])[0]
    assert not torch.allclose(g_w, g_s)
