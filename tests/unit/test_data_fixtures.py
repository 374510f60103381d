"""Shared helpers for the data tests (plain functions, cached per session; not a conftest).

`tiny_tokenizer()` is a byte-level BPE trained on the demo corpus, with the special tokens the
templates use, wrapped in `PreTrainedTokenizerFast` with a chatml `chat_template`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from dataflex.data import demo_texts, make_demo_data

SPECIAL_TOKENS = [
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
]
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def small_demo_dir() -> Path:
    """A small demo corpus (read-only for tests: copy it before editing files)."""
    path = Path(tempfile.mkdtemp(prefix="dataflex-demo-")) / "data"
    make_demo_data(path, seed=0, train_per_domain=20, dev_per_domain=4, test_per_domain=8, text_docs_per_domain=20)
    return path


@functools.cache
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_texts(small_demo_dir()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHATML_JINJA,
    )


def write_registry(dataset_dir: Path, entries: dict) -> Path:
    """Write `dataset_info.json` into `dataset_dir` (created)."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "dataset_info.json").write_text(json.dumps(entries, indent=2))
    return dataset_dir


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .json (list) or .jsonl depending on the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=2))
    return path


def one_dataset(dataset_dir: Path, rows: list[dict], name: str = "ds", ext: str = "json", **entry) -> Path:
    """A dataset_dir with a single dataset `name` holding `rows`."""
    write_rows(dataset_dir / f"{name}.{ext}", rows)
    return write_registry(dataset_dir, {name: {"file_name": f"{name}.{ext}", **entry}})
