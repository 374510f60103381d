"""The embedded default model: a tiny Llama initialised by `models.tiny` and briefly pre-trained here on
the demo text with the project's one training loop (full fine-tuning), so it is a real small LM.

`arch="moe"` builds the same model as a Mixtral-style mixture of experts (top-2 routing over 8 experts, 4 in the
test size; attention, tokenizer and special tokens as the Llama one), for the `dynamic_moe` mixer and
`freeze_gate`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import datasets

from dataflex.config import ModelConfig, RunConfig
from dataflex.core.errors import ConfigError
from dataflex.data import demo_texts
from dataflex.models import TINY_META_FILE, init_tiny_model, load_model, load_tokenizer
from dataflex.train.run import Run
from dataflex.train.trainer import TrainingArguments
from dataflex.utils.io import atomic_dir, atomic_write_json, sha256_json
from dataflex.utils.logging import logger

ARCHS = ("llama", "moe")
# The MoE variant of each tiny size: (experts, experts per token, each expert's FFN width). Two of 8 experts of
# width 256 are about the dense default's 688-wide MLP per token, so it trains about as fast.
MOE_SIZES: dict[str, tuple[int, int, int]] = {"default": (8, 2, 256), "test": (4, 2, 64)}


def to_moe(model_dir: str | Path, size: str, seed: int) -> Path:
    """Replace the tiny Llama in `model_dir` (`init_tiny_model`'s output) by a Mixtral of the same shape with
    `MOE_SIZES[size]` experts, randomly initialised from `seed`; the tokenizer files are kept."""
    import torch
    from transformers import AutoConfig, GenerationConfig, MixtralConfig, MixtralForCausalLM

    experts, top_k, width = MOE_SIZES[size]
    dense = AutoConfig.from_pretrained(str(model_dir))
    config = MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        intermediate_size=width,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=dense.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
    )
    generation = GenerationConfig.from_pretrained(str(model_dir))
    with torch.random.fork_rng(devices=[]):  # the init is a function of the seed alone; the caller's RNG is kept
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
    model.generation_config = generation
    model_dir = Path(model_dir)
    for old in model_dir.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(model_dir)
    meta_file = model_dir / TINY_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(
        arch="moe",
        num_parameters=sum(p.numel() for p in model.parameters()),
        moe={"num_local_experts": experts, "num_experts_per_tok": top_k, "intermediate_size": width},
    )
    atomic_write_json(meta_file, meta)
    return model_dir


def pack_texts(tokenizer: object, texts: list[str], block_size: int) -> datasets.Dataset:
    """Concatenate texts (each ended by eos) and cut them into blocks: a pt-style pool of one domain."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    # The data contract's metadata, so the run core treats it like any pool (one domain).
    meta = {"domains": ["demo_text"], "stage": "pt", "fingerprint": sha256_json(blocks), "block_size": block_size}
    return datasets.Dataset.from_dict(
        {
            "input_ids": blocks,
            "labels": [list(b) for b in blocks],
            "sample_id": list(range(len(blocks))),
            "domain_id": [0] * len(blocks),
        },
        info=datasets.DatasetInfo(description=json.dumps(meta)),
    )


def make_tiny_model(
    output_dir: str | Path,
    data_dir: str | Path,
    *,
    size: str = "default",
    arch: str = "llama",
    seed: int = 0,
    pretrain_steps: int = 300,
    block_size: int = 128,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    progress_bar: bool = True,
) -> Path:
    """Initialise the tiny model (`arch` llama or moe) on the demo corpus at `data_dir` and pre-train it; written
    atomically."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown tiny model arch {arch!r}: use one of {', '.join(ARCHS)}")
    output_dir = Path(output_dir)
    texts = demo_texts(data_dir)
    with tempfile.TemporaryDirectory(prefix="tiny_model_") as work:
        init_dir = init_tiny_model(Path(work) / "init", texts, size=size, seed=seed)
        if arch == "moe":
            to_moe(init_dir, size, seed)
        tokenizer = load_tokenizer(str(init_dir))
        pool = pack_texts(tokenizer, texts, block_size)
        model = None
        if pretrain_steps > 0:
            args = TrainingArguments(
                output_dir=str(Path(work) / "run"),
                per_device_train_batch_size=batch_size,
                learning_rate=learning_rate,
                lr_scheduler_type="cosine",
                warmup_ratio=0.05,
                max_steps=pretrain_steps,
                seed=seed,
                logging_steps=max(pretrain_steps // 10, 1),
                weight_decay=0.01,
                progress_bar=progress_bar,
            )
            cfg = RunConfig(model=ModelConfig(str(init_dir), finetuning_type="full", dtype="fp32"), train=args)
            run = Run(cfg, pool)
            result, model = run.train(), run.model
            logger.info(
                "tiny model pre-trained %d steps on %d blocks, final loss %.3f",
                result.global_step,
                len(pool),
                result.final_train_loss,
            )
        with atomic_dir(output_dir) as tmp:
            for item in Path(init_dir).iterdir():
                if item.is_file() and item.suffix != ".safetensors":
                    shutil.copy2(item, tmp / item.name)
            if model is None:
                model = load_model(str(init_dir), finetuning_type="full", dtype="fp32", seed=seed)
            model.save_pretrained(tmp, safe_serialization=True)
    return output_dir
