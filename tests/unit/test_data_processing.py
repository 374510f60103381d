"""build_dataset: columns, domain ids, pt truncation / packing, max_samples, errors, metadata, cache, split."""

from __future__ import annotations

import copy
import shutil

import datasets
import pytest

from dataflex.core.errors import ConfigError, DataError
from dataflex.data import (
    IGNORE_INDEX,
    build_dataset,
    build_dataset_cached,
    dataset_fingerprint,
    dataset_metadata,
    domain_names,
    processing_fingerprint,
    split_validation,
)
from dataflex.data import processing as processing_mod

try:
    from tests.unit.test_data_fixtures import one_dataset, small_demo_dir, tiny_tokenizer, write_registry, write_rows
except ImportError:  # tests/unit is not a package: pytest puts it on sys.path
    from test_data_fixtures import one_dataset, small_demo_dir, tiny_tokenizer, write_registry, write_rows

SFT = ["arith_train", "reverse_train", "facts_train"]
PT = ["text_stories_train", "text_noisy_train"]


def _build(**kw):
    kw.setdefault("dataset_dir", small_demo_dir())
    kw.setdefault("tokenizer", tiny_tokenizer())
    return build_dataset(**kw)


def test_columns_ids_and_domain_order():
    ds = _build(dataset=SFT, cutoff_len=64)
    assert set(ds.column_names) == {"input_ids", "labels", "sample_id", "domain_id", "source_row"}
    assert ds.features["sample_id"].dtype == "int64" and ds.features["domain_id"].dtype == "int64"
    assert ds["sample_id"] == list(range(len(ds)))
    assert ds["domain_id"] == [0] * 20 + [1] * 20 + [2] * 20
    assert domain_names(ds) == SFT
    for ex in ds:
        assert len(ex["input_ids"]) == len(ex["labels"]) <= 64
        assert any(x != IGNORE_INDEX for x in ex["labels"])
    # Domain id = position in the list: reversing the list reverses the ids.
    rev = _build(dataset=SFT[::-1], cutoff_len=64)
    assert domain_names(rev) == SFT[::-1]
    assert (
        rev.filter(lambda r: r["domain_id"] == 0)["input_ids"] == ds.filter(lambda r: r["domain_id"] == 2)["input_ids"]
    )


def test_comma_string_equals_list():
    a = _build(dataset=",".join(SFT), cutoff_len=64)
    b = _build(dataset=SFT, cutoff_len=64)
    assert a["input_ids"] == b["input_ids"] and dataset_fingerprint(a) == dataset_fingerprint(b)


def test_max_samples_takes_first_rows_per_dataset():
    full = _build(dataset=SFT, cutoff_len=64)
    few = _build(dataset=SFT, cutoff_len=64, max_samples=3)
    assert few["domain_id"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for d in range(3):
        assert few["input_ids"][3 * d : 3 * d + 3] == full["input_ids"][20 * d : 20 * d + 3]
    assert dataset_metadata(few)["domain_sizes"] == [3, 3, 3]


def test_pt_truncation_and_packing():
    tok = tiny_tokenizer()
    whole = _build(dataset=PT, stage="pt", cutoff_len=4096)
    assert all(ex["input_ids"][-1] == tok.eos_token_id for ex in whole)
    assert whole["labels"] == whole["input_ids"]
    cut = _build(dataset=PT, stage="pt", cutoff_len=8)
    assert len(cut) == len(whole)
    for a, b in zip(cut["input_ids"], whole["input_ids"]):
        assert a == b[:8]
    packed = _build(dataset=PT, stage="pt", cutoff_len=16, packing=True)
    assert packed["labels"] == packed["input_ids"]
    for d in range(2):
        stream = [t for ids, dom in zip(whole["input_ids"], whole["domain_id"]) if dom == d for t in ids]
        blocks = [ids for ids, dom in zip(packed["input_ids"], packed["domain_id"]) if dom == d]
        assert [t for b in blocks for t in b] == stream  # nothing lost, no block crosses domains
        assert all(len(b) == 16 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert packed["sample_id"] == list(range(len(packed)))


def test_truncation_drops_fully_masked_rows_and_errors_when_none_remain(tmp_path, caplog):
    # LF's budget split keeps a short response whole; a long prompt + a longer response leaves it 0 tokens.
    long_prompt = {"instruction": " ".join(["word"] * 400), "input": "", "output": " ".join(["ok"] * 5)}
    short = {"instruction": "Say ok.", "input": "", "output": "ok"}
    d = one_dataset(tmp_path, [long_prompt, short])
    ds = build_dataset(dataset="ds", dataset_dir=d, tokenizer=tiny_tokenizer(), cutoff_len=12)
    assert len(ds) == 1 and ds["sample_id"] == [0]
    assert "dropped 1 row(s) with no supervised token" in caplog.text
    d2 = one_dataset(tmp_path / "b", [long_prompt])
    with pytest.raises(DataError, match=r"every sample is fully masked.*cutoff_len=12.*train_on_prompt"):
        build_dataset(dataset="ds", dataset_dir=d2, tokenizer=tiny_tokenizer(), cutoff_len=12)
    ok = build_dataset(dataset="ds", dataset_dir=d2, tokenizer=tiny_tokenizer(), cutoff_len=12, train_on_prompt=True)
    assert len(ok) == 1 and len(ok[0]["input_ids"]) == 12


def test_lf_truncation_budget_split():
    # LLaMA-Factory infer_seqlen: short response kept whole, short prompt kept whole, else proportional.
    assert processing_mod._infer_seqlen(100, 3, 20) == (17, 3)
    assert processing_mod._infer_seqlen(3, 100, 20) == (3, 17)
    assert processing_mod._infer_seqlen(30, 10, 20) == (15, 5)


def test_bad_settings_raise_before_any_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized before validating")

    monkeypatch.setattr(processing_mod, "_tokenize_turns", boom)
    monkeypatch.setattr(processing_mod, "_batch_encode", boom)
    cases = [
        (dict(cutoff_len=0), ConfigError, "cutoff_len must be an integer >= 1"),
        (dict(stage="dpo"), ConfigError, "stage must be one of sft, pt"),
        (dict(template="nope"), ConfigError, "unknown template 'nope'"),
        (dict(max_samples=0), ConfigError, "max_samples"),
        (dict(packing=True), ConfigError, "packing is supported for stage pt only"),
        (dict(dataset="arith_train,zzz"), DataError, "dataset 'zzz' is not in"),
        (dict(dataset=""), ConfigError, "dataset is empty"),
        # pt text rows have no `output`: the column error names dataset, column and row, before tokenizing
        (
            dict(dataset="arith_train,text_stories_train"),
            DataError,
            r"dataset 'text_stories_train': row 0 has no column 'output' \(mapped as response\)",
        ),
    ]
    for kw, err, msg in cases:
        kw = {"dataset": SFT, **kw}
        with pytest.raises(err, match=msg):
            _build(**kw)


def test_data_errors_name_the_dataset(tmp_path):
    tok = tiny_tokenizer()
    d = tmp_path / "d"
    write_rows(d / "empty.json", [])
    write_rows(d / "noout.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    swapped = [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]
    write_rows(d / "badroles.json", [{"conversations": swapped}])
    write_rows(d / "unknownrole.json", [{"conversations": [{"from": "user", "value": "x"}]}])
    write_registry(
        d,
        {
            "empty": {"file_name": "empty.json"},
            "noout": {"file_name": "noout.jsonl"},
            "missing": {"file_name": "sub/missing.json"},
            "badroles": {"file_name": "badroles.json", "formatting": "sharegpt"},
            "unknownrole": {"file_name": "unknownrole.json", "formatting": "sharegpt"},
        },
    )
    cases = {
        "empty": r"dataset 'empty': .*empty\.json has no rows",
        "noout": r"dataset 'noout': row 1 has no column 'output' \(mapped as response\)",
        "missing": r"dataset 'missing': file .*sub/missing\.json not found",
        "badroles": r"dataset 'badroles' is empty after filtering: of 1 rows, 1 had roles that do not alternate",
        "unknownrole": r"dataset 'unknownrole': row 0 message 0 has role 'user'.*user_tag",
    }
    for name, msg in cases.items():
        with pytest.raises(DataError, match=msg):
            build_dataset(dataset=name, dataset_dir=d, tokenizer=tok)
    # A fingerprint needs the files too: same error, no tokenization.
    with pytest.raises(DataError, match="not found"):
        processing_fingerprint(dataset="missing", dataset_dir=d, tokenizer=tok)


def test_metadata_survives_save_and_load(tmp_path):
    ds = _build(dataset=SFT, cutoff_len=64, template="chatml")
    ds.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert dataset_metadata(back) == dataset_metadata(ds)
    assert domain_names(back) == SFT and back["input_ids"] == ds["input_ids"]
    meta = dataset_metadata(back)
    assert (meta["stage"], meta["template"], meta["cutoff_len"]) == ("sft", "chatml", 64)
    assert len(meta["fingerprint"]) == 64


def test_fingerprint_without_tokenizing_and_sensitivity(tmp_path):
    tok = tiny_tokenizer()
    kw = dict(dataset=SFT, dataset_dir=small_demo_dir(), tokenizer=tok, cutoff_len=64)
    fp = processing_fingerprint(**kw)
    assert fp == dataset_fingerprint(build_dataset(**kw))
    other_tok = copy.deepcopy(tok)
    other_tok.chat_template = "{{ messages }}"
    changed = [
        processing_fingerprint(**{**kw, "cutoff_len": 65}),
        processing_fingerprint(**{**kw, "template": "chatml"}),
        processing_fingerprint(**{**kw, "train_on_prompt": True}),
        processing_fingerprint(**{**kw, "max_samples": 5}),
        processing_fingerprint(**{**kw, "dataset": SFT[::-1]}),
        processing_fingerprint(**{**kw, "tokenizer": other_tok}),
    ]
    assert fp not in changed and len(set(changed)) == len(changed)
    # Content, not location: a copied corpus has the same fingerprint; an edited file does not.
    copy_dir = tmp_path / "copy"
    shutil.copytree(small_demo_dir(), copy_dir)
    assert processing_fingerprint(**{**kw, "dataset_dir": copy_dir}) == fp
    (copy_dir / "arith_train.json").write_text((copy_dir / "arith_train.json").read_text().replace('"1', '"2', 1))
    assert processing_fingerprint(**{**kw, "dataset_dir": copy_dir}) != fp


def test_cached_build_reuses_and_misses_on_change(tmp_path, monkeypatch):
    kw = dict(dataset=SFT, dataset_dir=small_demo_dir(), tokenizer=tiny_tokenizer(), cutoff_len=64)
    first = build_dataset_cached(tmp_path / "cache", **kw)
    fp = dataset_fingerprint(first)
    assert (tmp_path / "cache" / fp / "dataset_info.json").is_file()
    calls = []
    real = processing_mod.build_dataset

    def counting(**k):
        calls.append(k)
        return real(**k)

    monkeypatch.setattr(processing_mod, "build_dataset", counting)
    again = build_dataset_cached(tmp_path / "cache", **kw)
    assert calls == [] and again["input_ids"] == first["input_ids"] and domain_names(again) == SFT
    other = build_dataset_cached(tmp_path / "cache", **{**kw, "cutoff_len": 32})
    assert len(calls) == 1 and dataset_fingerprint(other) != fp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([fp, dataset_fingerprint(other)])


def test_split_validation_stratified_and_keeps_metadata():
    ds = _build(dataset=SFT, cutoff_len=64)
    train, val = split_validation(ds, 0.25, seed=0)
    assert (len(train), len(val)) == (45, 15)
    assert sorted(val["domain_id"]) == [0] * 5 + [1] * 5 + [2] * 5
    assert train["sample_id"] == list(range(45)) and val["sample_id"] == list(range(15))
    both = list(train["input_ids"]) + list(val["input_ids"])
    assert sorted(map(tuple, both)) == sorted(map(tuple, ds["input_ids"]))
    for part in (train, val):
        assert domain_names(part) == SFT
        assert dataset_metadata(part)["split"]["parent_fingerprint"] == dataset_fingerprint(ds)
    assert dataset_fingerprint(train) != dataset_fingerprint(val)
    again, val2 = split_validation(ds, 0.25, seed=0)
    assert val2["input_ids"] == val["input_ids"]
    assert split_validation(ds, 0.25, seed=1)[1]["input_ids"] != val["input_ids"]
    assert len(split_validation(ds, 7, seed=0)[1]) == 7
    assert dataset_metadata(ds).get("split") is None  # the parent is untouched
    for bad in (0, 0.0, 1.0, 60, -1, True, "0.1"):
        with pytest.raises(ConfigError, match="val_size"):
            split_validation(ds, bad)
