"""dataset_info.json parsing, name lists, readers and their error messages."""

from __future__ import annotations

import re

import pytest

from dataflex.core.errors import ConfigError, DataError
from dataflex.data import DatasetAttr, load_dataset_info, parse_dataset_names, read_rows, resolve_datasets

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
        ('{"a": {"formatting": "alpaca"}}', r"dataset 'a': entry has no 'file_name'"),
        ('{"a": {"hf_hub_url": "x/y"}}', r"no 'file_name' \(hf_hub_url entries are not supported offline\)"),
        ('{"a": {"file_name": "a.json", "formatting": "openai"}}', r"dataset 'a': unknown formatting 'openai'"),
        ('{"a": {"file_name": "a.json", "columns": {"answer": "x"}}}', r"unknown column role 'answer'"),
        ("[1, 2]", r"expected a JSON object"),
    ],
)
def test_registry_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "dataset_info.json").write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset_info(tmp_path)


def test_parse_dataset_names():
    assert parse_dataset_names(" a, b ,c ") == ["a", "b", "c"]
    assert parse_dataset_names(["a", " b"]) == ["a", "b"]
    assert parse_dataset_names(["a,b", "c"]) == ["a", "b", "c"]
    for bad in (None, "", " , ", []):
        with pytest.raises(ConfigError, match="dataset is empty"):
            parse_dataset_names(bad)
    with pytest.raises(ConfigError, match="more than once"):
        parse_dataset_names("a,b,a")
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
