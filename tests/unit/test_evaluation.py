"""Evaluation metrics against reference computations (on the untrained test-size model).
(Exact match on a memorised answer is in tests/integration/test_evaluation_exact_match.py.)"""

from __future__ import annotations

import math

import torch

from dataflex.data import DataCollatorForCausalLM
from dataflex.evaluation import _prompt_and_answer, eval_loss
from dataflex.models import load_model


def test_eval_loss_is_token_weighted_mean(untrained_model_dir, sft_pool, tokenizer):
    model = load_model(str(untrained_model_dir), finetuning_type="full", dtype="fp32")
    ds = sft_pool.select(range(0, 30, 3))
    got = eval_loss(model, ds, DataCollatorForCausalLM(tokenizer), batch_size=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ds:  # one sample at a time, HF's own loss (token mean), re-weighted by token count
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    assert got["num_tokens"] == count
    assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-5)


def test_prompt_answer_split():
    assert _prompt_and_answer([5, 6, 7, 8, 1], [-100, -100, -100, 8, 1]) == ([5, 6, 7], [8, 1])
    assert _prompt_and_answer([5, 6], [-100, -100]) is None
    # multi-turn: the last assistant turn is the answer, earlier turns are part of the prompt
    assert _prompt_and_answer([1, 2, 3, 4, 5, 6], [-100, 2, -100, -100, 5, 6]) == ([1, 2, 3, 4], [5, 6])
