"""DataCollatorForCausalLM: right padding, -100 labels, attention mask, id pass-through."""

from __future__ import annotations

import copy

import pytest
import torch

from dataflex.core.errors import ConfigError
from dataflex.data import DataCollatorForCausalLM, build_dataset

try:
    from tests.unit.test_data_fixtures import small_demo_dir, tiny_tokenizer
except ImportError:  # tests/unit is not a package: pytest puts it on sys.path
    from test_data_fixtures import small_demo_dir, tiny_tokenizer

FEATURES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_id": 4, "domain_id": 1, "text": "dropped"},
    {"input_ids": [8], "labels": [8], "sample_id": 9, "domain_id": 0, "text": "dropped"},
]


def test_right_padding_and_pass_through():
    batch = DataCollatorForCausalLM(0)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_id", "domain_id"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["sample_id"].tolist() == [4, 9] and batch["domain_id"].tolist() == [1, 0]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_pad_to_multiple_and_tokenizer_pad_id():
    tok = tiny_tokenizer()
    batch = DataCollatorForCausalLM(tok, pad_to_multiple_of=4)(FEATURES)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][1, 1:].tolist() == [tok.pad_token_id] * 3
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert DataCollatorForCausalLM(no_pad).pad_token_id == tok.eos_token_id  # LF's fallback
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        DataCollatorForCausalLM(0, pad_to_multiple_of=0)


def test_collates_a_built_dataset():
    tok = tiny_tokenizer()
    ds = build_dataset(dataset="arith_train,chat_train", dataset_dir=small_demo_dir(), tokenizer=tok, cutoff_len=64)
    rows = [ds[i] for i in (0, len(ds) - 1)]
    batch = DataCollatorForCausalLM(tok)(rows)
    n = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, n)
    assert batch["domain_id"].tolist() == [0, 1] and batch["sample_id"].tolist() == [0, len(ds) - 1]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
