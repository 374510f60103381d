"""Exact match: a model fine-tuned by heart on one sample scores 1.
(The other evaluation metrics are in tests/unit/test_evaluation.py.)"""

from __future__ import annotations

import torch

from dataflex.evaluation import _prompt_and_answer, exact_match
from dataflex.models import load_model


def test_exact_match_counts_a_memorised_answer(tiny_model_dir, sft_pool, tokenizer):
    """Greedy generation is compared with the reference answer: a model that outputs the answer scores 1."""
    model = load_model(str(tiny_model_dir), finetuning_type="full", dtype="fp32")
    row = sft_pool[0]
    prompt, answer = _prompt_and_answer(row["input_ids"], row["labels"])
    # Teach the one sample by heart (full fine-tuning, plain SGD steps on it).
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
    for _ in range(60):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    one = sft_pool.select([0])
    assert exact_match(model, tokenizer, one, max_new_tokens=len(answer) + 2, max_samples=1, batch_size=1) == {
        "accuracy": 1.0,
        "num_generated": 1,
    }
