"""Tiny offline models: deterministic init, HF round trip, sizes, generation."""

from __future__ import annotations

import json

import pytest
import torch

from dataflex.core.errors import ConfigError
from dataflex.models import SPECIAL_TOKENS, TINY_META_FILE, init_tiny_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny language model learns the structure of the demo text.",
    "Data selection, mixture and weighting change what the model sees during training.",
    "Hello world! Numbers like 12, 345 and 6789 appear too.",
    "Ceci est une phrase en français, avec des accents: é, è, à.",
] * 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_tiny_model(tmp_path_factory.mktemp("tiny") / "m", TEXTS, size="test", seed=0)


def test_init_is_deterministic_and_leaves_global_rng_alone(tmp_path, tiny_dir):
    rng_before = torch.get_rng_state()
    again = init_tiny_model(tmp_path / "again", TEXTS, size="test", seed=0)
    other = init_tiny_model(tmp_path / "other", TEXTS, size="test", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name in ("model.safetensors", "tokenizer.json", "config.json", TINY_META_FILE):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    # The tokenizer depends on the texts only, not the seed.
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    # Atomic: no temp dirs left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_reload_with_auto_classes(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    # Special tokens have fixed ids and encode as single tokens.
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok("<|im_start|>user")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    text = "The quick brown fox, é!"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == expected
    meta = json.loads((tiny_dir / TINY_META_FILE).read_text())
    assert meta["size"] == "test" and meta["seed"] == 0
    assert meta["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_generation(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    inputs = tok(["The quick brown"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.parametrize(("size", "lo", "hi"), [("test", 100_000, 300_000), ("default", 2_000_000, 8_000_000)])
def test_parameter_counts(tmp_path, size, lo, hi):
    out = init_tiny_model(tmp_path / size, TEXTS, size=size, seed=0)
    n = json.loads((out / TINY_META_FILE).read_text())["num_parameters"]
    print(f"tiny {size}: {n} parameters")
    assert lo <= n <= hi


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown tiny model size"):
        init_tiny_model(tmp_path / "x", TEXTS, size="huge")
    with pytest.raises(ConfigError, match="no non-empty texts"):
        init_tiny_model(tmp_path / "x", ["", "  "], size="test")
    assert not (tmp_path / "x").exists()
