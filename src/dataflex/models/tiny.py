"""Tiny Llama-architecture models built offline: a BPE tokenizer trained on given texts + random weights.

They make the whole project runnable without network or GPU: every training / selection / evaluation path
is exercised on a real (if small) causal LM with the same layout (GQA attention, SwiGLU MLP) as Llama.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dataflex.core.errors import ConfigError
from dataflex.utils.io import atomic_dir, atomic_write_json
from dataflex.utils.logging import logger

# Order fixes the ids (0..9): ids never depend on the training texts, so templates can rely on them.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message, optional assistant header for generation.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int


TINY_SIZES: dict[str, TinySpec] = {
    # ~4M parameters: learns the demo text in minutes on a CPU.
    "default": TinySpec(2000, 256, 4, 4, 2, 688, 512),
    # ~0.1M parameters: for unit tests (init + forward in milliseconds).
    "test": TinySpec(512, 64, 2, 4, 2, 128, 256),
}

TINY_META_FILE = "dataflex_tiny.json"


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Byte-level BPE (GPT-2/Llama-3 style): every string is encodable, so <unk> is never produced.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def init_tiny_model(output_dir: str | os.PathLike, texts: list[str], *, size: str = "default", seed: int = 0) -> Path:
    """Train a tokenizer on `texts`, build a randomly initialised LlamaForCausalLM, save both as an HF dir.

    Deterministic: the same texts, size and seed give byte-identical tokenizer.json and model.safetensors.
    The global torch RNG is left untouched. Returns the output directory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if size not in TINY_SIZES:
        raise ConfigError(f"unknown tiny model size {size!r}: use one of {sorted(TINY_SIZES)}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ConfigError("init_tiny_model got no non-empty texts: pass the corpus the tokenizer should be trained on")
    spec = TINY_SIZES[size]
    t0 = time.perf_counter()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(texts, spec.vocab_size),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHATML_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
        padding_side="right",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        # The real vocab can be smaller than asked for when the corpus is small: size embeddings to it.
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    # Stop generation at the end of a chat turn as well as at </s> (ChatML and Llama-3 style turns).
    model.generation_config.eos_token_id = [ids["</s>"], ids["<|im_end|>"], ids["<|eot_id|>"]]
    model.generation_config.pad_token_id = ids["<pad>"]

    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "size": size,
        "seed": seed,
        "num_parameters": n_params,
        "vocab_size": len(tokenizer),
        "num_texts": len(texts),
        "texts_sha256": hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest(),
        "spec": asdict(spec),
    }
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TINY_META_FILE, meta)
    logger.info(
        "tiny model %r: %d params, vocab %d, seed %d -> %s (%.1fs)",
        size,
        n_params,
        len(tokenizer),
        seed,
        output_dir,
        time.perf_counter() - t0,
    )
    return Path(output_dir)
