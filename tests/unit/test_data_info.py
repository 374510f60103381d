"""dataset_info.json parsing, name lists, readers and their error messages."""

from __future__ import annotations

import re

import pytest

from dataflex.core.errors import ConfigError, DataError
from dataflex.data import (
    DatasetAttr,
    load_dataset_info,
    parse_dataset_names,
    read_rows,
    resolve_datasets,
    sample_rows,
)

try:
    from tests.unit.test_data_fixtures import one_dataset, write_registry, write_rows
except ImportError:  # tests/unit is not a package: pytest puts it on sys.path
    from test_data_fixtures import one_dataset, write_registry, write_rows

ROWS = [{"instruction": "Add.", "input": "1 + 2", "output": "3"}, {"instruction": "Add.", "input": "", "output": "0"}]


def test_defaults_follow_llama_factory(tmp_path):
    write_registry(
        tmp_path,
        {
            "a": {"file_name": "a.json"},
            "s": {"file_name": "s.json", "formatting": "sharegpt"},
            "t": {"file_name": "t.jsonl", "columns": {"prompt": "text"}, "tags": {"domain": "x"}},
            "o": {
                "file_name": "o.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "system": "sys"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            },
        },
    )
    info = load_dataset_info(tmp_path)
    assert list(info) == ["a", "s", "t", "o"]
    a = info["a"]
    assert (a.formatting, a.prompt, a.query, a.response, a.history, a.system) == (
        "alpaca",
        "instruction",
        "input",
        "output",
        None,
        None,
    )
    s = info["s"]
    assert (s.messages, s.role_tag, s.content_tag, s.user_tag, s.assistant_tag) == (
        "conversations",
        "from",
        "value",
        "human",
        "gpt",
    )
    assert (s.observation_tag, s.function_tag, s.system_tag) == ("observation", "function_call", "system")
    assert info["t"].prompt == "text" and info["t"].extra_tags == {"domain": "x"}
    o = info["o"]
    assert (o.messages, o.system, o.role_tag, o.content_tag, o.user_tag, o.assistant_tag) == (
        "messages",
        "sys",
        "role",
        "content",
        "user",
        "assistant",
    )
    assert a.path(tmp_path) == tmp_path / "a.json"
    assert isinstance(a, DatasetAttr)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"dataset_info\.json not found"),
        ('{"a": {"file_name": "a.json",}\n}', r"dataset_info\.json:1:\d+: malformed JSON"),
        ("[1, 2]", r"expected a JSON object"),
    ],
)
def test_registry_file_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "dataset_info.json").write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset_info(tmp_path)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"formatting": "alpaca"}, r"entry has no 'file_name' \(nor hf_hub_url, ms_hub_url or script_url\)"),
        ({"file_name": "a.json", "formatting": "openai"}, r"unknown formatting 'openai'"),
        ({"file_name": "a.json", "columns": {"answer": "x"}}, r"unknown column role 'answer'"),
        ({"file_name": "a.json", "num_samples": 0}, r"'num_samples' must be an integer >= 1"),
        ({"hf_hub_url": "x/y", "split": 3}, r"'split' must be a string"),
        ({"om_hub_url": "x/y"}, r"om_hub_url \(openMind\) entries are not supported"),
        ({"cloud_file_name": "s3://b/a.json"}, r"cloud_file_name entries are not supported"),
        ("a.json", r"entry must be an object"),
    ],
)
def test_entry_errors_name_entry_and_file_when_used(tmp_path, entry, match):
    write_registry(tmp_path, {"a": entry, "ok": {"file_name": "ok.json"}})
    assert [a.name for a in resolve_datasets("ok", tmp_path)] == ["ok"]  # the bad entry is never looked at
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dataset_info.json'}: dataset 'a': ")) as err:
        resolve_datasets("ok,a", tmp_path)
    assert re.search(match, str(err.value)) and "\n" not in str(err.value)


# Shaped like DataFlex's own data/dataset_info.json: local entries among hub, script and preference ones.
REGISTRY = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
    "deepctrl": {"ms_hub_url": "deepctrl/deepctrl-sft-data"},
    "belle_multiturn": {"script_url": "belle_multiturn", "formatting": "sharegpt"},
    "adgen_eval": {
        "hf_hub_url": "HasturOfficial/adgen",
        "split": "validation",
        "subset": "x",
        "folder": "data",
        "num_samples": 5,
        "columns": {"prompt": "content", "response": "summary"},
    },
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "orca_pairs": {"hf_hub_url": "Intel/orca_dpo_pairs", "columns": {"chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "columns": {"kto_tag": "label"}},
    "wiki_demo": {"file_name": "wiki_demo.jsonl", "columns": {"prompt": "text"}},
    "broken": {"formatting": "alpaca"},
}


def test_only_named_entries_are_parsed(tmp_path):
    write_registry(tmp_path, REGISTRY)
    info = load_dataset_info(tmp_path)
    assert list(info) == list(REGISTRY) and "alpaca_en" in info and "nope" not in info
    assert [a.name for a in resolve_datasets(["wiki_demo", "alpaca_en_demo"], tmp_path)] == [
        "wiki_demo",
        "alpaca_en_demo",
    ]
    hub = info["adgen_eval"]
    assert (hub.load_from, hub.source, hub.subset, hub.split, hub.folder, hub.num_samples, hub.prompt) == (
        "hf_hub",
        "HasturOfficial/adgen",
        "x",
        "validation",
        "data",
        5,
        "content",
    )
    assert not hub.is_local and hub.file_name is None
    assert hub.describe() == "hf_hub_url 'HasturOfficial/adgen' (subset 'x', folder 'data', split 'validation')"
    with pytest.raises(DataError, match=r"dataset 'adgen_eval' is loaded from hf_hub_url .* no local file"):
        hub.path(tmp_path)
    assert (info["alpaca_en"].load_from, info["alpaca_en"].split) == ("hf_hub", "train")  # hf wins, LF's default
    assert (info["deepctrl"].load_from, info["deepctrl"].source) == ("ms_hub", "deepctrl/deepctrl-sft-data")
    script = info["belle_multiturn"]
    assert (script.load_from, script.source, script.formatting) == ("script", "belle_multiturn", "sharegpt")
    # unknown names still list the known ones, all of them counted, none parsed
    with pytest.raises(
        DataError, match=r"dataset 'nope' is not in .*; known: alpaca_en_demo, alpaca_en, .*\(10 in all\)"
    ):
        resolve_datasets("nope", tmp_path)


def test_modelscope_hub_follows_llama_factory_choice(tmp_path, monkeypatch):
    write_registry(tmp_path, REGISTRY)
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert load_dataset_info(tmp_path)["alpaca_en"].load_from == "ms_hub"


def test_local_file_name_wins_over_hub_url(tmp_path):
    write_registry(tmp_path, {"a": {"file_name": "a.json", "hf_hub_url": "org/a"}})
    assert load_dataset_info(tmp_path)["a"].is_local


@pytest.mark.parametrize(
    ("name", "stage"),
    [("dpo_en_demo", "rm / dpo"), ("orca_pairs", "rm / dpo"), ("kto_en_demo", "kto")],
)
def test_preference_entries_refused_only_when_named(tmp_path, name, stage):
    write_registry(tmp_path, REGISTRY)
    with pytest.raises(DataError) as err:
        resolve_datasets(["alpaca_en_demo", name], tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'dataset_info.json'}: dataset '{name}': ")
    assert f"for LLaMA-Factory's {stage} stage" in msg and "trains sft and pt only" in msg and "\n" not in msg


def test_parse_dataset_names():
    assert parse_dataset_names(" a, b ,c ") == ["a", "b", "c"]
    assert parse_dataset_names(["a", " b"]) == ["a", "b"]
    assert parse_dataset_names(["a,b", "c"]) == ["a", "b", "c"]
    for bad in (None, "", " , ", []):
        with pytest.raises(ConfigError, match="dataset is empty"):
            parse_dataset_names(bad)
    with pytest.raises(ConfigError, match="^dataset lists a more than once; each domain must appear once$"):
        parse_dataset_names("a,b,a")
    with pytest.raises(ConfigError, match="^eval_dataset lists b more than once; each eval set must appear once$"):
        parse_dataset_names(["b", "b"], "eval_dataset")
    with pytest.raises(ConfigError, match="^eval_dataset is empty"):
        parse_dataset_names([], "eval_dataset")
    with pytest.raises(ConfigError):
        parse_dataset_names(3)  # type: ignore[arg-type]


def test_resolve_keeps_order_and_names_unknown(tmp_path):
    write_registry(tmp_path, {n: {"file_name": f"{n}.json"} for n in ("x", "y", "z")})
    assert [a.name for a in resolve_datasets("z,x", tmp_path)] == ["z", "x"]
    with pytest.raises(DataError, match=r"dataset 'w' is not in .*dataset_info\.json; known: x, y, z"):
        resolve_datasets(["x", "w"], tmp_path)


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_read_json_and_jsonl(tmp_path, ext):
    d = one_dataset(tmp_path, ROWS, ext=ext)
    assert read_rows(load_dataset_info(d)["ds"], d) == ROWS


def test_read_parquet_folder_and_json_lines_in_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    folder = tmp_path / "parts"
    write_rows(folder / "b.jsonl", ROWS[1:])
    write_rows(folder / "a.jsonl", ROWS[:1])
    (folder / "README.md").write_text("ignored")
    (tmp_path / "lines.json").write_text("".join(f'{{"text": "t{i}"}}\n' for i in range(3)))
    write_registry(
        tmp_path, {"p": {"file_name": "p.parquet"}, "f": {"file_name": "parts"}, "l": {"file_name": "lines.json"}}
    )
    info = load_dataset_info(tmp_path)
    assert read_rows(info["p"], tmp_path) == ROWS
    assert read_rows(info["f"], tmp_path) == ROWS  # files in name order
    assert read_rows(info["l"], tmp_path) == [{"text": f"t{i}"} for i in range(3)]


def test_reader_errors_name_file_line_and_dataset(tmp_path):
    write_registry(
        tmp_path,
        {
            "missing": {"file_name": "nope.json"},
            "badjson": {"file_name": "bad.json"},
            "badjsonl": {"file_name": "bad.jsonl"},
            "notrows": {"file_name": "notrows.json"},
            "csvx": {"file_name": "data.xlsx"},
        },
    )
    (tmp_path / "bad.json").write_text('[\n  {"instruction": "a"},\n  {"instruction": }\n]')
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "notrows.json").write_text('[{"a": 1}, 5]')
    (tmp_path / "data.xlsx").write_text("x")
    info = load_dataset_info(tmp_path)
    missing = re.escape(str(tmp_path.resolve() / "nope.json"))
    with pytest.raises(DataError, match=rf"dataset 'missing': file {missing} not found"):
        read_rows(info["missing"], tmp_path)
    with pytest.raises(DataError, match=r"dataset 'badjson': .*bad\.json:3:\d+: malformed JSON"):
        read_rows(info["badjson"], tmp_path)
    with pytest.raises(DataError, match=r"dataset 'badjsonl': .*bad\.jsonl:4: malformed JSON line"):
        read_rows(info["badjsonl"], tmp_path)
    with pytest.raises(DataError, match=r"item 1 is a int, expected an object"):
        read_rows(info["notrows"], tmp_path)
    with pytest.raises(DataError, match=r"dataset 'csvx': unsupported file type 'data\.xlsx'"):
        read_rows(info["csvx"], tmp_path)


def _lf_num_samples(n_rows: int, num_samples: int, seed: int) -> list[int]:
    """LLaMA-Factory's `_load_single_dataset` resampling, on numpy's global state seeded as its run seeds it."""
    import numpy as np

    np.random.seed(seed)
    indexes = np.random.permutation(n_rows)[:num_samples]
    if num_samples - len(indexes) > 0:
        indexes = np.concatenate((indexes, np.random.choice(n_rows, num_samples - len(indexes))))
    return indexes.tolist()


@pytest.mark.parametrize("num_samples", [3, 10, 25])
def test_num_samples_follows_llama_factory(tmp_path, num_samples):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    d = one_dataset(tmp_path, rows, num_samples=num_samples)
    attr = load_dataset_info(d)["ds"]
    got = read_rows(attr, d, seed=7)
    assert got == [rows[i] for i in _lf_num_samples(10, num_samples, 7)]
    assert len(got) == num_samples
    if num_samples <= 10:
        assert len({r["instruction"] for r in got}) == num_samples  # no repeat until every row is used
    else:
        assert {r["instruction"] for r in got} == {r["instruction"] for r in rows}  # all rows, then repeats
    assert read_rows(attr, d, seed=7) == got  # seeded: the same rows every time
    assert sample_rows(rows, num_samples, seed=7) == got
