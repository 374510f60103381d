"""Deterministic demo corpus: short, learnable instruction tasks + plain-text domains + a sharegpt chat set.

Every instruction domain shares one surface form (an instruction, an input, a few-token answer) and
differs in the operation asked for, so data selection quality is measurable on it (domains with
different templates would be trivially separable). Answers are short,
so exact-match accuracy of greedy generation is meaningful for a tiny model.

Randomness: one `random.Random` per (seed, domain), never the global RNG, so the bytes written depend on
the arguments only. The `facts` table is fixed (independent of `seed`): it is knowledge to memorise, so
its dev/test rows ask facts also seen in training; every other domain's splits have disjoint inputs.
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataflex.core.errors import ConfigError
from dataflex.data.dataset_info import load_dataset_info
from dataflex.data.readers import read_rows
from dataflex.utils.io import atomic_write_json, atomic_write_text
from dataflex.utils.logging import logger

INSTRUCTION_DOMAINS = ("arith", "reverse", "sort", "wordcount", "facts", "format")
TEXT_DOMAINS = ("text_stories", "text_numbers", "text_noisy")

_WORDS = (
    "the cat dog sun moon tree bird fish red blue green small big old new happy sad fast slow "
    "house river road hill cup book pen box car ship rain snow wind star girl boy man king "
    "queen bread milk apple stone gold door lamp park city farm song game hat coat ball"
).split()
_ADJ = "small big red old happy quiet brave tiny lazy clever".split()
_ANIMALS = "cat dog fox bird horse mouse frog bear duck owl".split()
_VERBS = "ran walked flew swam hurried drove sailed went".split()
_PLACES = "park river market forest hill city farm school garden beach".split()
_NAMES = "Anna Ben Cara Dan Eva Finn Gina Hugo Iris Jack".split()
_THINGS = "apples books coins stones shells cups pens hats".split()

Row = dict[str, Any]


def _facts_table() -> dict[str, dict[str, str]]:
    """Invented countries -> capital / currency. Fixed (own RNG, constant seed): the same world for every seed."""
    rng = random.Random("dataflex-facts-v1")
    syll = ["ka", "lo", "mi", "ra", "ven", "tor", "sa", "bel", "dun", "zi", "qua", "mor", "el", "pa", "ri", "gon"]

    def word(n: int) -> str:
        return "".join(rng.choice(syll) for _ in range(n)).capitalize()

    table: dict[str, dict[str, str]] = {}
    while len(table) < 24:
        country = word(2) + rng.choice(["ia", "land", "stan", "ora"])
        if country not in table:
            table[country] = {"capital": word(2), "currency": word(1).lower() + rng.choice(["o", "ar", "un"])}
    return table


FACTS = _facts_table()

# ------------------------------------------------------------------ task generators: rng -> (key, instr, input, output)
_PHRASES = {
    "arith": ["Calculate the result.", "Solve the arithmetic problem.", "What is the answer?"],
    "reverse": ["Reverse the letters.", "Write the letters in reverse order.", "Spell the letters backwards."],
    "sort": [
        "Sort the numbers in ascending order.",
        "Arrange the numbers from smallest to largest.",
        "Put the numbers in increasing order.",
    ],
    "wordcount": [
        "Count the words in the sentence.",
        "How many words are in the sentence?",
        "Give the number of words.",
    ],
    "capital": [
        "What is the capital of the country?",
        "Name the capital city of the country.",
        "Which city is the capital of the country?",
    ],
    "currency": [
        "What is the currency of the country?",
        "Name the currency of the country.",
        "Which money is used in the country?",
    ],
    "date": [
        "Convert the date to DD/MM/YYYY format.",
        "Rewrite the date as day/month/year.",
        "Change the date format to DD/MM/YYYY.",
    ],
    "upper": ["Write the word in upper case.", "Convert the word to capital letters.", "Uppercase the word."],
}


def _arith(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        inp, out = f"{a} + {b}", str(a + b)
    else:
        a, b = max(a, b), min(a, b)  # non-negative results keep answers short
        inp, out = f"{a} - {b}", str(a - b)
    return inp, rng.choice(_PHRASES["arith"]), inp, out


def _reverse(rng: random.Random) -> tuple[str, str, str, str]:
    # Letters are space-separated so each is its own token: reversal is learnable by a tiny BPE model.
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))]
    inp = " ".join(letters)
    return inp, rng.choice(_PHRASES["reverse"]), inp, " ".join(reversed(letters))


def _sort(rng: random.Random) -> tuple[str, str, str, str]:
    nums = [rng.randint(0, 30) for _ in range(rng.randint(3, 5))]
    inp = " ".join(map(str, nums))
    return inp, rng.choice(_PHRASES["sort"]), inp, " ".join(map(str, sorted(nums)))


def _wordcount(rng: random.Random) -> tuple[str, str, str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 9))]
    inp = " ".join(words)
    return inp, rng.choice(_PHRASES["wordcount"]), inp, str(len(words))


def _facts(rng: random.Random) -> tuple[str, str, str, str]:
    country = rng.choice(sorted(FACTS))
    relation = rng.choice(["capital", "currency"])
    return f"{relation}:{country}", rng.choice(_PHRASES[relation]), country, FACTS[country][relation]


def _format(rng: random.Random) -> tuple[str, str, str, str]:
    if rng.random() < 0.5:
        y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        inp = f"{y:04d}-{m:02d}-{d:02d}"
        return f"date:{inp}", rng.choice(_PHRASES["date"]), inp, f"{d:02d}/{m:02d}/{y:04d}"
    word = rng.choice(_WORDS) + rng.choice(["", *_WORDS[:20]])
    return f"upper:{word}", rng.choice(_PHRASES["upper"]), word, word.upper()


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str, str]]] = {
    "arith": _arith,
    "reverse": _reverse,
    "sort": _sort,
    "wordcount": _wordcount,
    "facts": _facts,
    "format": _format,
}


def _examples(domain: str, rng: random.Random, n: int) -> list[Row]:
    """n rows with distinct inputs where the task space allows (facts: a fixed table, repeats expected)."""
    gen = GENERATORS[domain]
    rows: list[Row] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        key, instr, inp, out = gen(rng)
        attempts += 1
        # Give up on distinct inputs when the space is (nearly) exhausted instead of looping forever.
        if domain != "facts" and key in seen and attempts < 50 * n:
            continue
        seen.add(key)
        rows.append({"instruction": instr, "input": inp, "output": out})
    return rows


def _wrong_answer(domain: str, rng: random.Random, correct: str) -> str:
    for _ in range(1000):
        out = GENERATORS[domain](rng)[3]
        if out != correct:
            return out
    return correct + "0"  # unreachable in practice: every task has more than one answer


# ------------------------------------------------------------------ plain text domains
def _story(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.6:
            out.append(
                f"The {rng.choice(_ADJ)} {rng.choice(_ANIMALS)} {rng.choice(_VERBS)} to the {rng.choice(_PLACES)}."
            )
        else:
            out.append(f"{rng.choice(_NAMES)} has {rng.randint(2, 9)} {rng.choice(_THINGS)}.")
    return " ".join(out)


def _numbers(rng: random.Random) -> str:
    start, step, n = rng.randint(0, 40), rng.randint(1, 5), rng.randint(4, 9)
    seq = " ".join(str(start + i * step) for i in range(n))
    if step == 1:
        return f"Count from {start} to {start + n - 1}: {seq}."
    return f"Count by {step} from {start}: {seq}."


def _noisy(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "#%&*@~^"
    parts = []
    for _ in range(rng.randint(6, 14)):
        if rng.random() < 0.5:
            parts.append(rng.choice(_WORDS))
        else:
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8))))
    return " ".join(parts)


TEXT_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "text_stories": _story,
    "text_numbers": _numbers,
    "text_noisy": _noisy,
}


# ------------------------------------------------------------------ writer
def make_demo_data(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    train_per_domain: int = 300,
    dev_per_domain: int = 16,
    test_per_domain: int = 64,
    text_docs_per_domain: int = 300,
    noise_domain: str | None = None,
    noise_rate: float = 0.0,
) -> Path:
    """Write the demo corpus and its `dataset_info.json` into `output_dir`; return `output_dir`.

    Each file is written atomically and `dataset_info.json` last, so a crash never leaves a registry
    that points at missing or partial files. Same arguments -> byte-identical files.
    """
    for name, v in (
        ("train_per_domain", train_per_domain),
        ("dev_per_domain", dev_per_domain),
        ("test_per_domain", test_per_domain),
        ("text_docs_per_domain", text_docs_per_domain),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"make_demo_data: {name} must be an integer >= 1, got {v!r}")
    if noise_domain is not None and noise_domain not in INSTRUCTION_DOMAINS:
        raise ConfigError(
            f"noise_domain {noise_domain!r} is not a demo domain; use one of {', '.join(INSTRUCTION_DOMAINS)}"
        )
    if not 0.0 <= noise_rate <= 1.0:
        raise ConfigError(f"noise_rate must be in [0, 1], got {noise_rate}")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    alpaca_cols = {"prompt": "instruction", "query": "input", "response": "output"}
    train_pools: dict[str, list[Row]] = {}

    for dom in INSTRUCTION_DOMAINS:
        rng = random.Random(f"{seed}:{dom}")
        rows = _examples(dom, rng, train_per_domain + dev_per_domain + test_per_domain)
        splits = {
            "train": rows[:train_per_domain],
            "dev": rows[train_per_domain : train_per_domain + dev_per_domain],
            "test": rows[train_per_domain + dev_per_domain :],
        }
        train_pools[dom] = [dict(r) for r in splits["train"]]  # clean copies for the chat set
        tags: dict[str, Any] = {"domain": dom}
        if dom == noise_domain and noise_rate > 0:
            train = splits["train"]
            noisy = set(rng.sample(range(len(train)), round(noise_rate * len(train))))
            for i, row in enumerate(train):
                row["noisy"] = i in noisy  # ground truth for reweighting experiments
                if i in noisy:
                    row["output"] = _wrong_answer(dom, rng, row["output"])
            logger.info("demo data: %d of %d %s_train outputs replaced by wrong answers", len(noisy), len(train), dom)
        for split, split_rows in splits.items():
            name = f"{dom}_{split}"
            atomic_write_json(out / f"{name}.json", split_rows)
            split_tags = {**tags, "split": split}
            if split == "train" and dom == noise_domain and noise_rate > 0:
                split_tags["noise_rate"] = noise_rate
            info[name] = {
                "file_name": f"{name}.json",
                "formatting": "alpaca",
                "columns": alpaca_cols,
                "tags": split_tags,
            }

    for dom in TEXT_DOMAINS:
        rng = random.Random(f"{seed}:{dom}")
        gen = TEXT_GENERATORS[dom]
        for split, n in (("train", text_docs_per_domain), ("test", test_per_domain)):
            name = f"{dom}_{split}"
            lines = "".join(json.dumps({"text": gen(rng)}) + "\n" for _ in range(n))
            atomic_write_text(out / f"{name}.jsonl", lines)
            info[name] = {
                "file_name": f"{name}.jsonl",
                "formatting": "alpaca",
                "columns": {"prompt": "text"},
                "tags": {"domain": dom, "split": split},
            }

    rng = random.Random(f"{seed}:chat")
    chats = []
    for _ in range(max(4, train_per_domain // 3)):
        conv = []
        if rng.random() < 0.25:
            conv.append({"from": "system", "value": "You are a helpful assistant."})
        for _turn in range(rng.randint(2, 3)):
            row = rng.choice(train_pools[rng.choice(INSTRUCTION_DOMAINS)])
            conv.append({"from": "human", "value": f"{row['instruction']}\n{row['input']}"})
            conv.append({"from": "gpt", "value": row["output"]})
        chats.append({"conversations": conv})
    atomic_write_json(out / "chat_train.json", chats)
    info["chat_train"] = {
        "file_name": "chat_train.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "domain": "chat",
            "split": "train",
        },
    }

    atomic_write_json(out / "dataset_info.json", info)
    return out


def demo_texts(output_dir: str | os.PathLike) -> list[str]:
    """Every text of the train files (instructions, inputs, outputs, pt text, chat turns), in registry order.

    Meant for training a tokenizer or pre-training the tiny model; dev/test files are left out.
    """
    texts: list[str] = []
    for name, attr in load_dataset_info(output_dir).items():
        if attr.extra_tags.get("split", "train" if name.endswith("_train") else None) != "train":
            continue
        for row in read_rows(attr, output_dir):
            if attr.formatting == "sharegpt":
                values = [m.get(attr.content_tag) for m in row.get(attr.messages or "conversations", [])]
            else:
                values = [row.get(c) for c in (attr.prompt, attr.query, attr.response) if c]
            texts += [v for v in values if isinstance(v, str) and v]
    return texts
