"""The embedded default model: deterministic for a seed, a standard HF directory, actually pre-trained."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from dataflex.train.tiny_model import make_tiny_model


def test_make_tiny_model_is_deterministic_and_loadable(demo_dir, tmp_path):
    kw = dict(size="test", seed=1, pretrain_steps=6, block_size=32, batch_size=4, progress_bar=False)
    a = make_tiny_model(tmp_path / "a", demo_dir, **kw)
    b = make_tiny_model(tmp_path / "b", demo_dir, **kw)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.chat_template and model.config.model_type == "llama"
    assert json.loads((a / "dataflex_tiny.json").read_text())["size"] == "test"
    # pre-training moved the weights away from the initialisation
    init = make_tiny_model(tmp_path / "c", demo_dir, **{**kw, "pretrain_steps": 0})
    assert (init / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
