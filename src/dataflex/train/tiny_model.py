"""The embedded default model: a tiny Llama initialised by `models.tiny` and briefly pre-trained here on
the demo text with the project's one training loop (full fine-tuning), so it is a real small LM."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import datasets

from dataflex.config import ModelConfig, RunConfig
from dataflex.data import demo_texts
from dataflex.models import init_tiny_model, load_model, load_tokenizer
from dataflex.train.run import Run
from dataflex.train.trainer import TrainingArguments
from dataflex.utils.io import atomic_dir, sha256_json
from dataflex.utils.logging import logger


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
    seed: int = 0,
    pretrain_steps: int = 300,
    block_size: int = 128,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    progress_bar: bool = True,
) -> Path:
    """Initialise the tiny model on the demo corpus at `data_dir` and pre-train it; written atomically."""
    output_dir = Path(output_dir)
    texts = demo_texts(data_dir)
    with tempfile.TemporaryDirectory(prefix="tiny_model_") as work:
        init_dir = init_tiny_model(Path(work) / "init", texts, size=size, seed=seed)
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
