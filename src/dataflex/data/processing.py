"""Tokenisation + label masking: raw LF datasets -> one `datasets.Dataset` honouring the data contract.

Columns: `input_ids`, `labels` (-100 = not trained), `sample_id` (0..N-1, position in the pool),
`domain_id` (position of the source in the `dataset` list), `source_row` (the row's index in its raw file, so
a selection can be written back in the original format; -1 for packed pt blocks, which span rows).
`ds.info.description` holds JSON metadata
(domain names, settings, content fingerprint); it survives `save_to_disk` / `load_from_disk`.

sft truncation follows LLaMA-Factory exactly (`infer_seqlen`): per turn, the remaining budget is split
between prompt and response in proportion to their lengths (a short side is kept whole), each side keeps
its head. Rows left without any supervised token are dropped (counted in the log).
pt: text + eos; truncated to cutoff_len, or with packing concatenated per domain and cut into
cutoff_len blocks (the last, shorter block of each domain is kept, unlike LF, so small domains survive).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from dataflex.core.errors import ConfigError, DataError
from dataflex.data.converters import row_to_messages, row_to_text
from dataflex.data.dataset_info import DatasetAttr, resolve_datasets
from dataflex.data.readers import read_rows, source_hashes
from dataflex.data.templates import InvalidConversation, Template, _tokenize_turns, get_template
from dataflex.utils.io import atomic_dir, sha256_json
from dataflex.utils.logging import logger

# Bump when a change here alters the tokens/labels produced for the same inputs: invalidates caches.
DATA_CODE_VERSION = "2"
IGNORE_INDEX = -100
STAGES = ("sft", "pt")

FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "sample_id": datasets.Value("int64"),
        "domain_id": datasets.Value("int64"),
        "source_row": datasets.Value("int64"),
    }
)

DatasetArg = str | Sequence[str]


# ----------------------------------------------------------------------------- validation / fingerprint
def _check_settings(*, template: str, cutoff_len: int, stage: str, max_samples: int | None, packing: bool) -> Template:
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise ConfigError(f"cutoff_len must be an integer >= 1, got {cutoff_len!r}")
    bad_max = isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    if max_samples is not None and bad_max:
        raise ConfigError(f"max_samples must be an integer >= 1 or null, got {max_samples!r}")
    if packing and stage != "pt":
        raise ConfigError("packing is supported for stage pt only; set packing: false for sft")
    return get_template(template)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything in a tokenizer that changes token ids: vocab/merges/normaliser, specials, chat template."""
    parts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "added": sorted((str(k), int(v)) for k, v in tokenizer.get_added_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["backend"] = backend.to_str()  # the whole tokenizer.json: vocab, merges, pre-tokeniser
    else:
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    return sha256_json(parts)


def _fingerprint(attrs: list[DatasetAttr], dataset_dir: str | os.PathLike, tokenizer: Any, settings: dict) -> str:
    return sha256_json(
        {
            "data_code_version": DATA_CODE_VERSION,
            "datasets": [{"attr": a.to_dict(), "files": source_hashes(a, dataset_dir)} for a in attrs],
            "settings": settings,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
    )


def _settings(**kw: Any) -> dict[str, Any]:
    return {k: kw[k] for k in ("stage", "template", "cutoff_len", "train_on_prompt", "max_samples", "packing", "seed")}


def _prepare(
    *,
    dataset: DatasetArg,
    dataset_dir: str | os.PathLike,
    tokenizer: Any,
    template: str = "default",
    cutoff_len: int = 1024,
    stage: str = "sft",
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    packing: bool = False,
    seed: int = 0,
) -> tuple[Any, list[DatasetAttr], dict[str, Any], str]:
    """Checks and hashing shared by building, caching and fingerprinting: (template, attrs, settings, fingerprint)."""
    tmpl = _check_settings(
        template=template, cutoff_len=cutoff_len, stage=stage, max_samples=max_samples, packing=packing
    )
    attrs = resolve_datasets(dataset, dataset_dir)
    settings = _settings(
        stage=stage,
        template=template,
        cutoff_len=cutoff_len,
        train_on_prompt=bool(train_on_prompt),
        max_samples=max_samples,
        packing=bool(packing),
        seed=seed,
    )
    return tmpl, attrs, settings, _fingerprint(attrs, dataset_dir, tokenizer, settings)


def processing_fingerprint(**kwargs: Any) -> str:
    """The fingerprint `build_dataset(**kwargs)` would give, without tokenizing (raw files, settings, tokenizer)."""
    return _prepare(**kwargs)[3]


# ----------------------------------------------------------------------------- building
def _infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of a length budget between prompt (source) and response (target)."""
    if target_len * 2 < cutoff_len:  # short response: keep it whole, truncate the prompt
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # short prompt: keep it whole, truncate the response
        max_target_len = cutoff_len - source_len
    else:  # both long: proportional
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def _supervised_example(
    pairs: list[tuple[list[int], list[int]]], cutoff_len: int, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for source, target in pairs:
        budget = cutoff_len - len(input_ids)
        if budget <= 0:
            break
        s_len, t_len = _infer_seqlen(len(source), len(target), budget)
        source, target = source[:s_len], target[:t_len]
        input_ids += source + target
        labels += (source if train_on_prompt else [IGNORE_INDEX] * s_len) + target
    return input_ids, labels


def _load_sources(attrs: list[DatasetAttr], dataset_dir: str | os.PathLike, max_samples: int | None) -> list[list]:
    sources = []
    for attr in attrs:
        rows = read_rows(attr, dataset_dir)
        if not rows:
            raise DataError(
                f"dataset '{attr.name}': {attr.location(dataset_dir)} has no rows; add data or drop the name"
            )
        if max_samples is not None:
            rows = rows[:max_samples]  # first rows, like LF
        sources.append(rows)
    return sources


def build_dataset(
    *,
    dataset: DatasetArg,
    dataset_dir: str | os.PathLike,
    tokenizer: Any,
    template: str = "default",
    cutoff_len: int = 1024,
    stage: str = "sft",
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    packing: bool = False,
    seed: int = 0,
) -> datasets.Dataset:
    """Read, convert, tokenize and mask the listed datasets; see the module docstring for the contract.

    `seed` is recorded (and fingerprinted) but nothing here is random: order is file order, domain by domain.
    """
    tmpl, attrs, settings, fingerprint = _prepare(
        dataset=dataset,
        dataset_dir=dataset_dir,
        tokenizer=tokenizer,
        template=template,
        cutoff_len=cutoff_len,
        stage=stage,
        train_on_prompt=train_on_prompt,
        max_samples=max_samples,
        packing=packing,
        seed=seed,
    )
    names = [a.name for a in attrs]
    if stage == "sft":
        tmpl.check_tokenizer(tokenizer)
    elif tokenizer.eos_token_id is None:
        raise ConfigError("stage pt appends eos to every text but the tokenizer has no eos token; set eos_token")
    sources = _load_sources(attrs, dataset_dir, max_samples)

    # Convert every row first: column errors surface before any tokenization.
    if stage == "sft":
        converted = [[row_to_messages(r, a, i) for i, r in enumerate(rows)] for a, rows in zip(attrs, sources)]
        per_domain = _encode_sft(attrs, converted, tokenizer, tmpl, cutoff_len, bool(train_on_prompt))
    else:
        texts = [[row_to_text(r, a, i) for i, r in enumerate(rows)] for a, rows in zip(attrs, sources)]
        per_domain = _encode_pt(texts, tokenizer, cutoff_len, bool(packing))

    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    domain_ids: list[int] = []
    source_rows: list[int] = []
    for d, examples in enumerate(per_domain):
        for ids, lab, row in examples:
            input_ids.append(ids)
            labels.append(lab)
            domain_ids.append(d)
            source_rows.append(row)
    meta = {
        "domains": names,
        "stage": stage,
        "template": template,
        "cutoff_len": cutoff_len,
        "fingerprint": fingerprint,
        "settings": settings,
        "domain_sizes": [len(e) for e in per_domain],
        "data_code_version": DATA_CODE_VERSION,
    }
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": input_ids,
            "labels": labels,
            "sample_id": list(range(len(input_ids))),
            "domain_id": domain_ids,
            "source_row": source_rows,
        },
        info=datasets.DatasetInfo(description=json.dumps(meta), features=FEATURES),
    )
    logger.info(
        "built %s dataset: %d samples from %s (fingerprint %s)",
        stage,
        len(ds),
        ", ".join(f"{n}={s}" for n, s in zip(names, meta["domain_sizes"])),
        fingerprint[:12],
    )
    return ds


def _encode_sft(
    attrs: list[DatasetAttr],
    converted: list[list[tuple[list[dict[str, str]], str | None]]],
    tokenizer: Any,
    tmpl: Template,
    cutoff_len: int,
    train_on_prompt: bool,
) -> list[list[tuple[list[int], list[int], int]]]:
    out = []
    masked_total = 0
    problems = []
    for attr, convs in zip(attrs, converted):
        rendered, kept, invalid = [], [], 0
        for row, (messages, system) in enumerate(convs):
            try:
                rendered.append(tmpl.render(tokenizer, messages, system))
                kept.append(row)
            except InvalidConversation:
                invalid += 1  # LF drops rows whose roles do not alternate
        examples, masked = [], 0
        for row, pairs in zip(kept, _tokenize_turns(tokenizer, rendered)):
            ids, lab = _supervised_example(pairs, cutoff_len, train_on_prompt)
            if all(x == IGNORE_INDEX for x in lab):
                masked += 1
                continue
            examples.append((ids, lab, row))
        if invalid:
            logger.warning(
                "dataset '%s': dropped %d row(s) whose roles do not alternate user/assistant", attr.name, invalid
            )
        if masked:
            logger.warning(
                "dataset '%s': dropped %d row(s) with no supervised token after truncation to cutoff_len=%d",
                attr.name,
                masked,
                cutoff_len,
            )
        masked_total += masked
        if not examples:
            problems.append((attr.name, len(convs), invalid, masked))
        out.append(examples)
    if problems and all(not e for e in out) and masked_total:
        raise DataError(
            f"every sample is fully masked after truncation to cutoff_len={cutoff_len} (no supervised token); "
            "raise cutoff_len or set train_on_prompt: true"
        )
    if problems:
        name, n, invalid, masked = problems[0]
        raise DataError(
            f"dataset '{name}' is empty after filtering: of {n} rows, {invalid} had roles that do not alternate "
            f"user/assistant and {masked} had no supervised token within cutoff_len={cutoff_len}; "
            "fix the data, raise cutoff_len or drop the dataset"
        )
    return out


def _encode_pt(
    texts: list[list[str]], tokenizer: Any, cutoff_len: int, packing: bool
) -> list[list[tuple[list[int], list[int], int]]]:
    eos = tokenizer.eos_token_id
    out = []
    for domain_texts in texts:
        tokenized = [list(ids) + [eos] for ids in _batch_encode(tokenizer, domain_texts)]
        if packing:
            stream = [t for ids in tokenized for t in ids]
            blocks = [(stream[i : i + cutoff_len], -1) for i in range(0, len(stream), cutoff_len)]
        else:
            blocks = [(ids[:cutoff_len], row) for row, ids in enumerate(tokenized)]
        out.append([(b, list(b), row) for b, row in blocks])
    return out


def _batch_encode(tokenizer: Any, texts: list[str], chunk: int = 2048) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        ids += tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
    return ids


# ----------------------------------------------------------------------------- metadata
def dataset_metadata(ds: datasets.Dataset) -> dict[str, Any]:
    """The JSON metadata `build_dataset` stores in `ds.info.description`."""
    try:
        meta = json.loads(ds.info.description or "")
    except (json.JSONDecodeError, TypeError):
        meta = None
    if not isinstance(meta, dict) or "domains" not in meta:
        raise DataError(
            "dataset has no dataflex metadata (info.description); build it with dataflex.data.build_dataset"
        )
    return meta


def domain_names(ds: datasets.Dataset) -> list[str]:
    return list(dataset_metadata(ds)["domains"])


def dataset_fingerprint(ds: datasets.Dataset) -> str:
    return str(dataset_metadata(ds)["fingerprint"])


def _with_metadata(ds: datasets.Dataset, meta: dict[str, Any]) -> datasets.Dataset:
    ds.info.description = json.dumps(meta)
    return ds


# ----------------------------------------------------------------------------- cache
def build_dataset_cached(cache_dir: str | os.PathLike, **kwargs: Any) -> datasets.Dataset:
    """`build_dataset(**kwargs)`, reusing `cache_dir/<fingerprint>` when present (a changed input or setting misses)."""
    fp = processing_fingerprint(**kwargs)
    path = Path(cache_dir) / fp
    if (path / "dataset_info.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
            if dataset_fingerprint(ds) == fp:
                logger.info("reusing tokenized dataset %s", path)
                return ds
        except Exception as e:  # unreadable cache entry: rebuild it, never fail on a cache
            logger.warning("cache entry %s is unreadable (%s); rebuilding", path, e)
    ds = build_dataset(**kwargs)
    with atomic_dir(path) as tmp:
        ds.save_to_disk(str(tmp))
    CREATED_ENTRIES.append(path)
    return ds


# Cache entries this process wrote: a run refused after tokenising (its schedule never calls the component, ...)
# removes them again, so a refusal leaves nothing behind. Unlinking is safe for a run that has one memory-mapped.
CREATED_ENTRIES: list[Path] = []


def remove_created_entries() -> None:
    while CREATED_ENTRIES:
        entry = CREATED_ENTRIES.pop()
        shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):  # the cache folder too, if this run created it (it is empty then)
            entry.parent.rmdir()


# ----------------------------------------------------------------------------- validation split
def split_validation(
    ds: datasets.Dataset, val_size: float | int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) split, stratified by domain; both keep metadata and get fresh 0..N-1 sample ids.

    `val_size` in (0, 1) is a fraction, an int >= 1 a count. Order within each part follows the pool.
    """
    n = len(ds)
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ConfigError(f"val_size must be a fraction in (0, 1) or a count, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise ConfigError(f"val_size must be a fraction in (0, 1) or an integer count, got {val_size}")
        n_val = max(1, round(n * val_size))
    else:
        n_val = val_size
    if not 1 <= n_val < n:
        raise ConfigError(f"val_size={val_size} leaves no train or no validation sample out of {n}; pick 1..{n - 1}")
    meta = dataset_metadata(ds)
    domain_ids = np.asarray(ds["domain_id"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    # Largest-remainder allocation of n_val across domains, proportional to domain size.
    doms, counts = np.unique(domain_ids, return_counts=True)
    quota = counts * n_val / n
    alloc = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - alloc), kind="stable")[: n_val - alloc.sum()]:
        alloc[k] += 1
    val_idx: list[int] = []
    for d, k in zip(doms, alloc):
        members = np.flatnonzero(domain_ids == d)
        val_idx += rng.choice(members, size=min(int(k), len(members)), replace=False).tolist()
    val_set = set(val_idx)
    train_idx = [i for i in range(n) if i not in val_set]
    parent = meta["fingerprint"]
    parts = []
    for part, idx in (("train", train_idx), ("val", sorted(val_idx))):
        sub = ds.select(idx).flatten_indices(keep_in_memory=True)
        sub = sub.remove_columns("sample_id").add_column("sample_id", list(range(len(idx))))
        counts_part = np.bincount(np.asarray(sub["domain_id"], dtype=np.int64), minlength=len(meta["domains"]))
        new_meta = dict(meta)
        new_meta.update(
            fingerprint=sha256_json([parent, "split", part, val_size, seed]),
            split={"part": part, "val_size": val_size, "seed": seed, "parent_fingerprint": parent},
            domain_sizes=counts_part.tolist(),
        )
        parts.append(_with_metadata(sub, new_meta))
    return parts[0], parts[1]


# ----------------------------------------------------------------------------- generation (evaluation)
