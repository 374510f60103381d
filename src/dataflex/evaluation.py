"""Evaluation per eval set: token-mean loss, perplexity, and exact-match accuracy of greedy generation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from dataflex.data import DataCollatorForCausalLM
from dataflex.train.trainer.losses import IGNORE_INDEX, count_supervised_tokens, per_token_losses


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module, dataset: Any, collator: DataCollatorForCausalLM, batch_size: int
) -> dict[str, float]:
    """Token-weighted mean loss over every supervised token of the set (the HF Trainer's eval_loss)."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    cols = [c for c in ("input_ids", "labels") if c in dataset.column_names]
    data = dataset.select_columns(cols)
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        batch = collator([{k: rows[k][i] for k in cols} for i in range(len(rows["input_ids"]))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        total += float(per_token_losses(logits, batch["labels"]).sum())
        tokens += int(count_supervised_tokens(batch["labels"]).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_samples": len(data), "num_tokens": tokens}


def _prompt_and_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """Split a sample at its last supervised span (the last assistant turn): prompt ids, reference answer ids."""
    supervised = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not supervised:
        return None
    end = supervised[-1] + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start == 0:
        return None
    return input_ids[:start], input_ids[start:end]


@torch.no_grad()
def exact_match(
    model: torch.nn.Module, tokenizer: Any, dataset: Any, *, max_new_tokens: int, max_samples: int, batch_size: int
) -> dict[str, float]:
    """Greedy generation from each prompt; exact match of the stripped decoded answer with the reference."""
    model.eval()
    device = next(model.parameters()).device
    n = min(len(dataset), max_samples)
    rows = dataset.select(range(n))
    pairs = [p for p in (_prompt_and_answer(r["input_ids"], r["labels"]) for r in rows) if p is not None]
    if not pairs:
        return {}
    pad = tokenizer.pad_token_id
    stop = [t for t in {tokenizer.eos_token_id, *_end_of_turn_ids(tokenizer)} if t is not None]
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) for p, _ in chunk)
        # Left padding so every prompt ends at the same position and generation continues from it.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop,
        )
        for (_, ref), gen in zip(chunk, out[:, width:].tolist()):
            pred = tokenizer.decode(gen, skip_special_tokens=True).strip()
            target = tokenizer.decode(ref, skip_special_tokens=True).strip()
            correct += int(pred == target)
    return {"accuracy": correct / len(pairs), "num_generated": len(pairs)}


def _end_of_turn_ids(tokenizer: Any) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return ids


def evaluate_sets(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_sets: Mapping[str, Any],
    *,
    batch_size: int,
    generate: bool,
    max_new_tokens: int,
    max_generate_samples: int,
    stage: str,
) -> dict[str, dict]:
    collator = DataCollatorForCausalLM(tokenizer)
    results: dict[str, dict] = {}
    for name in tqdm(list(eval_sets), desc="evaluate", unit="set"):
        ds = eval_sets[name]
        metrics = eval_loss(model, ds, collator, batch_size)
        if generate and stage == "sft" and max_generate_samples > 0:
            metrics.update(
                exact_match(
                    model,
                    tokenizer,
                    ds,
                    max_new_tokens=max_new_tokens,
                    max_samples=max_generate_samples,
                    batch_size=batch_size,
                )
            )
        results[name] = metrics
    return results
