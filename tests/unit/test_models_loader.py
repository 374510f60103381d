"""Model loading: LoRA / full wrapping, save + reload, merge, path checks, dtypes, trainable state."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.models import (
    check_model_path,
    find_linear_target_modules,
    init_tiny_model,
    load_model,
    load_tokenizer,
    load_trainable_state_dict,
    merge_and_export,
    model_fingerprint,
    resolve_dtype,
    save_trained,
    trainable_state_dict,
)
from dataflex.utils.logging import logger

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Data selection, mixture and weighting change what the model sees during training.",
    "Hello world! Numbers like 12, 345 and 6789 appear too.",
] * 4

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return init_tiny_model(tmp_path_factory.mktemp("base") / "tiny", TEXTS, size="test", seed=0)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 200, (2, 12), generator=g)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _make_lora_b_nonzero(model: nn.Module) -> None:
    # Fresh LoRA B is zero (adapter is a no-op): make it non-zero so save/merge checks mean something.
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ------------------------------------------------------------------------------------------------ targets / wrapping
def test_lora_all_targets_every_linear_but_the_head(base_dir):
    model = load_model(str(base_dir), lora_target="all", lora_rank=4, device="cpu", seed=0)
    assert find_linear_target_modules(model) == ALL_LINEARS
    base = model.get_base_model()
    wrapped = {n for n, m in base.named_modules() if hasattr(m, "lora_A")}
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    linears = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert find_linear_target_modules(plain) == ALL_LINEARS
    n_layers = base.config.num_hidden_layers
    assert len(wrapped) == 7 * n_layers and wrapped == linears
    assert isinstance(base.lm_head, nn.Linear) and not hasattr(base.lm_head, "lora_A")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = model.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8  # alpha defaults to 2 * rank


def test_lora_comma_list_and_bad_target(base_dir):
    model = load_model(str(base_dir), lora_target="q_proj, v_proj", device="cpu")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    model = load_model(str(base_dir), lora_target=["down_proj"], device="cpu")
    assert set(model.peft_config["default"].target_modules) == {"down_proj"}
    with pytest.raises(ConfigError, match=r"lora_target c_attn matches no linear layer.*q_proj, k_proj"):
        load_model(str(base_dir), lora_target="q_proj,c_attn", device="cpu")
    with pytest.raises(ConfigError, match="lora_rank"):
        load_model(str(base_dir), lora_rank=0, device="cpu")
    with pytest.raises(ConfigError, match="unknown finetuning_type"):
        load_model(str(base_dir), finetuning_type="qlora", device="cpu")


def test_lora_init_deterministic_with_seed(base_dir):
    rng_before = torch.get_rng_state()
    a = trainable_state_dict(load_model(str(base_dir), device="cpu", seed=7))
    b = trainable_state_dict(load_model(str(base_dir), device="cpu", seed=7))
    c = trainable_state_dict(load_model(str(base_dir), device="cpu", seed=8))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_full_finetuning_trains_everything(base_dir):
    model = load_model(str(base_dir), finetuning_type="full", device="cpu")
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    frozen = load_model(str(base_dir), finetuning_type="full", device="cpu", is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    with pytest.raises(ConfigError, match="adapter_path is only valid"):
        load_model(str(base_dir), finetuning_type="full", adapter_path=str(base_dir), device="cpu")


def test_train_from_scratch_is_a_seeded_random_init_of_the_architecture(base_dir):
    """LLaMA-Factory's train_from_scratch: the config's architecture, random weights from the seed, global RNG kept."""
    rng_before = torch.get_rng_state()
    pretrained = load_model(str(base_dir), finetuning_type="full", device="cpu").state_dict()
    a = load_model(str(base_dir), finetuning_type="full", device="cpu", seed=3, from_scratch=True).state_dict()
    b = load_model(str(base_dir), finetuning_type="full", device="cpu", seed=3, from_scratch=True).state_dict()
    c = load_model(str(base_dir), finetuning_type="full", device="cpu", seed=4, from_scratch=True).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == pretrained.keys() and all(a[k].shape == pretrained[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("proj.weight")]
    assert all(not torch.equal(a[k], c[k]) for k in weights)
    assert all(not torch.equal(a[k], pretrained[k]) for k in weights)


# ------------------------------------------------------------------------------------------------ save / reload / merge
def test_save_trained_reload_and_merge(base_dir, tmp_path, batch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = load_model(str(base_dir), device="cpu", seed=0)
    _make_lora_b_nonzero(model)
    expected = _logits(model, batch)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(base_dir), batch))

    adapter = save_trained(model, tmp_path / "adapter", tokenizer=load_tokenizer(base_dir))
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()  # adapter only, not the base weights
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert torch.equal(_logits(reloaded, batch), expected)
    resumed = load_model(str(base_dir), adapter_path=str(adapter), device="cpu")
    assert any(p.requires_grad for p in resumed.parameters())
    assert torch.equal(_logits(resumed, batch), expected)
    frozen = load_model(str(base_dir), adapter_path=str(adapter), device="cpu", is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())

    merged_dir = merge_and_export(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged) is LlamaForCausalLM
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (merged_dir / "tokenizer.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    torch.testing.assert_close(_logits(merged, batch), expected, atol=1e-5, rtol=0)

    # Export dtype: fp16 is fine for export even on CPU; default keeps the base dtype (fp32 here).
    from safetensors import safe_open

    half_dir = merge_and_export(adapter, tmp_path / "merged16", dtype="fp16")
    with safe_open(half_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    with safe_open(merged_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}

    # A full model saves as a whole, loadable HF dir.
    full = load_model(str(base_dir), finetuning_type="full", device="cpu")
    full_dir = save_trained(full, tmp_path / "full")
    assert (full_dir / "model.safetensors").is_file() and (full_dir / "config.json").is_file()

    with pytest.raises(ConfigError, match="no adapter_config.json"):
        merge_and_export(base_dir, tmp_path / "nope")
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_model(str(base_dir), adapter_path=str(base_dir), device="cpu")


def test_model_fingerprint(base_dir, tmp_path):
    fp = model_fingerprint(str(base_dir))
    assert len(fp) == 64 and fp == model_fingerprint(str(base_dir))
    full = load_model(str(base_dir), finetuning_type="full", device="cpu")
    with torch.no_grad():
        full.lm_head.weight.add_(1.0)
    changed = save_trained(full, tmp_path / "changed")
    assert model_fingerprint(str(changed)) != fp
    assert model_fingerprint("some-org/some-model") == "hub:some-org/some-model"
    with pytest.raises(ConfigError):
        model_fingerprint(str(tmp_path / "missing" / "dir"))


# ------------------------------------------------------------------------------------------------ paths / tokenizer
def test_check_model_path_errors(base_dir, tmp_path, monkeypatch):
    check_model_path(str(base_dir))  # fine
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_path(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_path("./models/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        check_model_path(str(tmp_path / "empty"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="LoRA adapter"):
        check_model_path(str(tmp_path / "adapter"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_model_path(str(tmp_path / "file.txt"))

    hub_id = "dataflex-no-such-org/no-such-model"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    check_model_path(hub_id)  # online: left to transformers, no network call here
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(ConfigError, match="not in the Hugging Face cache.*offline"):
            check_model_path(hub_id)
        monkeypatch.delenv(var)


def test_load_tokenizer_pads_with_eos_when_missing(base_dir, tmp_path):
    tok = load_tokenizer(base_dir)
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded.pad_token == reloaded.eos_token == "</s>" and reloaded.padding_side == "right"


# ------------------------------------------------------------------------------------------------ dtypes
def test_resolve_dtype(monkeypatch, caplog):
    monkeypatch.setattr(logger, "propagate", True)
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("fp32", "cpu") is torch.float32
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    assert resolve_dtype("BF16", "cpu") is torch.bfloat16
    assert resolve_dtype("bfloat16", "cuda") is torch.bfloat16
    assert resolve_dtype("fp16", "cuda:0") is torch.float16
    with caplog.at_level(logging.WARNING, logger="dataflex"):
        assert resolve_dtype("float16", "cpu") is torch.float32
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fp32" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_load_model_bf16_on_cpu(base_dir, batch):
    model = load_model(str(base_dir), dtype="bf16", device="cpu", seed=0)
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base_params)
    assert torch.isfinite(_logits(model, batch).float()).all()


# ------------------------------------------------------------------------------------------------ trainable state
def test_trainable_state_round_trip_and_mismatch(base_dir, batch):
    model = load_model(str(base_dir), lora_rank=4, device="cpu", seed=0)
    _make_lora_b_nonzero(model)
    state = trainable_state_dict(model)
    assert state and all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    expected = _logits(model, batch)

    other = load_model(str(base_dir), lora_rank=4, device="cpu", seed=1)
    assert not torch.equal(_logits(other, batch), expected)
    load_trainable_state_dict(other, state)
    assert torch.equal(_logits(other, batch), expected)
    # The returned state is a copy: later training does not change it.
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    assert all(torch.equal(state[k], v) for k, v in trainable_state_dict(other).items())

    with pytest.raises(CheckpointError, match="shape"):
        load_trainable_state_dict(load_model(str(base_dir), lora_rank=8, device="cpu"), state)
    with pytest.raises(CheckpointError, match="lacks trainable parameter"):
        load_trainable_state_dict(load_model(str(base_dir), finetuning_type="full", device="cpu"), state)
    with pytest.raises(CheckpointError, match="unexpected parameter"):
        load_trainable_state_dict(load_model(str(base_dir), lora_target="q_proj", lora_rank=4, device="cpu"), state)
