"""Demo corpus: determinism, layout, noise option, demo_texts."""

from __future__ import annotations

import json

import pytest

from dataflex.core.errors import ConfigError
from dataflex.data import demo_texts, load_dataset_info, make_demo_data
from dataflex.data.demo import INSTRUCTION_DOMAINS, TEXT_DOMAINS

SMALL = dict(train_per_domain=12, dev_per_domain=3, test_per_domain=5, text_docs_per_domain=6)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(make_demo_data(tmp_path / "a", seed=3, **SMALL))
    b = _files(make_demo_data(tmp_path / "b", seed=3, **SMALL))
    c = _files(make_demo_data(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert a["arith_train.json"] != c["arith_train.json"]
    assert a["dataset_info.json"] == c["dataset_info.json"]  # the registry depends on the layout only


def test_layout_sizes_and_tags(tmp_path):
    d = make_demo_data(tmp_path / "d", seed=0, **SMALL)
    info = load_dataset_info(d)
    assert len(INSTRUCTION_DOMAINS) >= 6
    for dom in INSTRUCTION_DOMAINS:
        for split, n in (("train", 12), ("dev", 3), ("test", 5)):
            attr = info[f"{dom}_{split}"]
            assert attr.formatting == "alpaca"
            assert (attr.prompt, attr.query, attr.response) == ("instruction", "input", "output")
            assert attr.extra_tags == {"domain": dom, "split": split}
            rows = json.loads((d / attr.file_name).read_text())
            assert len(rows) == n
            assert all(len(r["output"].split()) <= 5 and r["output"] for r in rows)  # short answers
    for dom in TEXT_DOMAINS:
        assert info[f"{dom}_train"].prompt == "text" and info[f"{dom}_test"].extra_tags["split"] == "test"
    chat = info["chat_train"]
    assert chat.formatting == "sharegpt" and (chat.user_tag, chat.assistant_tag) == ("human", "gpt")


def test_held_out_inputs_are_disjoint_except_facts(tmp_path):
    d = make_demo_data(tmp_path / "d", seed=0, train_per_domain=60, dev_per_domain=8, test_per_domain=20)
    for dom in INSTRUCTION_DOMAINS:
        if dom == "facts":
            continue
        keys = {}
        for split in ("train", "dev", "test"):
            rows = json.loads((d / f"{dom}_{split}.json").read_text())
            keys[split] = {(r["instruction"] if dom == "format" else "", r["input"]) for r in rows}
        assert not keys["train"] & keys["test"] and not keys["train"] & keys["dev"], dom


def test_noise_only_touches_train_of_that_domain(tmp_path):
    clean = make_demo_data(tmp_path / "clean", seed=1, **SMALL)
    noisy = make_demo_data(tmp_path / "noisy", seed=1, noise_domain="arith", noise_rate=0.5, **SMALL)
    for name in _files(clean):
        if name not in ("arith_train.json", "dataset_info.json"):
            assert (clean / name).read_bytes() == (noisy / name).read_bytes(), name
    c = json.loads((clean / "arith_train.json").read_text())
    n = json.loads((noisy / "arith_train.json").read_text())
    flagged = [i for i, r in enumerate(n) if r["noisy"]]
    assert len(flagged) == 6
    for i, (rc, rn) in enumerate(zip(c, n)):
        assert rc["input"] == rn["input"]
        assert (rc["output"] != rn["output"]) == (i in flagged)
    assert load_dataset_info(noisy)["arith_train"].extra_tags["noise_rate"] == 0.5


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="noise_domain"):
        make_demo_data(tmp_path, noise_domain="nope", noise_rate=0.1)
    with pytest.raises(ConfigError, match="noise_rate"):
        make_demo_data(tmp_path, noise_domain="arith", noise_rate=1.5)
    with pytest.raises(ConfigError, match="train_per_domain"):
        make_demo_data(tmp_path, train_per_domain=0)


def test_demo_texts_cover_train_files_only(tmp_path):
    d = make_demo_data(tmp_path / "d", seed=0, **SMALL)
    texts = demo_texts(d)
    arith = json.loads((d / "arith_train.json").read_text())
    test_rows = json.loads((d / "arith_test.json").read_text())
    assert arith[0]["input"] in texts and arith[0]["output"] in texts
    assert not {r["input"] for r in test_rows} & set(texts)  # held-out inputs are not leaked
    story = json.loads((d / "text_stories_train.jsonl").read_text().splitlines()[0])["text"]
    assert story in texts
    chat = json.loads((d / "chat_train.json").read_text())
    assert chat[0]["conversations"][-1]["value"] in texts
