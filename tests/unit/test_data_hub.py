"""Hub / script entries of dataset_info.json (no network: `datasets.load_dataset` is replaced), offline errors,
and eval sets that are also training sets."""

from __future__ import annotations

import json
import sys
import types

import datasets
import pytest

from dataflex.config import DataConfig
from dataflex.core.errors import ConfigError, DataError
from dataflex.data import dataset_metadata, load_dataset_info, read_rows, source_hashes
from dataflex.data import pools as pools_mod
from dataflex.data.converters import row_to_messages
from dataflex.data.pools import build_named, build_pools, check_sources

try:
    from tests.unit.test_data_fixtures import tiny_tokenizer, write_registry, write_rows
except ImportError:  # tests/unit is not a package: pytest puts it on sys.path
    from test_data_fixtures import tiny_tokenizer, write_registry, write_rows

HUB_ROWS = [{"content": f"describe item {i}", "summary": f"item {i} is fine"} for i in range(6)]
LOCAL_ROWS = [{"instruction": "Add.", "input": f"{i} + 1", "output": str(i + 1)} for i in range(8)]
REGISTRY = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "identity": {"file_name": "identity.json"},
    "adgen": {
        "hf_hub_url": "HasturOfficial/adgen",
        "subset": "default",
        "folder": "data",
        "split": "validation",
        "columns": {"prompt": "content", "response": "summary"},
    },
    "alpaca_zh": {"hf_hub_url": "llamafactory/alpaca_zh", "ms_hub_url": "llamafactory/alpaca_zh"},
    "deepctrl": {"ms_hub_url": "deepctrl/deepctrl-sft-data", "columns": {"prompt": "content", "response": "summary"}},
    "belle_multiturn": {"script_url": "belle_multiturn", "columns": {"prompt": "content", "response": "summary"}},
    "ultra_chat": {"script_url": "org/ultra_chat", "formatting": "sharegpt"},
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
}
INFO = "dataset_info.json"


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "data"
    write_registry(d, REGISTRY)
    write_rows(d / "alpaca_en_demo.json", LOCAL_ROWS)
    write_rows(d / "identity.json", LOCAL_ROWS[:3])
    return d


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` replaced: records each call and returns HUB_ROWS (as a cached download would)."""
    calls: list[tuple[tuple, dict]] = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(HUB_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def _online(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def _data(d, **kw) -> DataConfig:
    return DataConfig(dataset_dir=str(d), cache_dir=str(d.parent / "cache"), **kw)


def test_hf_hub_entry_loads_through_datasets_and_maps_columns(corpus, fake_hub):
    attr = load_dataset_info(corpus)["adgen"]
    rows = read_rows(attr, corpus)
    assert fake_hub == [(("HasturOfficial/adgen",), {"name": "default", "data_dir": "data", "split": "validation"})]
    assert rows == HUB_ROWS
    messages, system = row_to_messages(rows[2], attr, 2)
    assert messages == [
        {"role": "user", "content": "describe item 2"},
        {"role": "assistant", "content": "item 2 is fine"},
    ]
    assert system is None
    check_sources(_data(corpus, dataset=["alpaca_en_demo", "adgen"]))  # every row converts


def test_hub_rows_are_validated_like_local_rows(corpus, fake_hub):
    # alpaca_zh maps the default columns (instruction / output): the hub rows lack them
    with pytest.raises(
        DataError, match=r"^dataset 'alpaca_zh': row 0 has no column 'instruction' \(mapped as prompt\)"
    ):
        check_sources(_data(corpus, dataset=["alpaca_zh"]))
    assert fake_hub[0][0] == ("llamafactory/alpaca_zh",)  # hf_hub_url wins over ms_hub_url, as in LF


def test_hub_num_samples_and_source_hashes(corpus, fake_hub):
    info = json.loads((corpus / INFO).read_text())
    info["adgen"]["num_samples"] = 9
    (corpus / INFO).write_text(json.dumps(info))
    attr = load_dataset_info(corpus)["adgen"]
    rows = read_rows(attr, corpus)
    assert len(rows) == 9 and {r["content"] for r in rows} == {r["content"] for r in HUB_ROWS}
    hashes = source_hashes(attr, corpus)
    assert hashes[0][0] == "hf_hub_url 'HasturOfficial/adgen' (subset 'default', folder 'data', split 'validation')"
    assert hashes == source_hashes(attr, corpus)
    local = load_dataset_info(corpus)["identity"]
    assert [h[0] for h in source_hashes(local, corpus)] == ["identity.json"]


def test_script_url_is_a_folder_under_dataset_dir_or_a_hub_id(corpus, fake_hub):
    (corpus / "belle_multiturn").mkdir()
    rows = read_rows(load_dataset_info(corpus)["belle_multiturn"], corpus)
    assert rows == HUB_ROWS
    assert fake_hub[-1] == ((str(corpus / "belle_multiturn"),), {"name": None, "data_dir": None, "split": "train"})
    read_rows(load_dataset_info(corpus)["ultra_chat"], corpus)
    assert fake_hub[-1][0] == ("org/ultra_chat",)


def test_ms_hub_needs_modelscope(corpus, monkeypatch, fake_hub):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails: not installed
    with pytest.raises(DataError) as err:
        read_rows(load_dataset_info(corpus)["deepctrl"], corpus)
    msg = str(err.value)
    assert msg.startswith(f"{corpus / INFO}: dataset 'deepctrl': ms_hub_url 'deepctrl/deepctrl-sft-data' needs")
    assert "pip install modelscope" in msg and "hf_hub_url" in msg and "\n" not in msg
    assert not fake_hub


def test_ms_hub_loads_through_modelscope(corpus, monkeypatch):
    calls = []

    class MsDataset:
        @staticmethod
        def load(**kwargs):
            calls.append(kwargs)
            return MsDataset()

        def to_hf_dataset(self):
            return datasets.Dataset.from_list(HUB_ROWS)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(MsDataset=MsDataset))
    assert read_rows(load_dataset_info(corpus)["deepctrl"], corpus) == HUB_ROWS
    assert calls == [
        {"dataset_name": "deepctrl/deepctrl-sft-data", "subset_name": None, "data_dir": None, "split": "train"}
    ]


def _raise(exc):
    def load_dataset(*args, **kwargs):
        raise exc

    return load_dataset


def test_hub_entry_without_network_is_one_line(corpus, monkeypatch):
    _online(monkeypatch)
    monkeypatch.setattr(datasets, "load_dataset", _raise(ConnectionError("Couldn't reach 'HasturOfficial/adgen'")))
    with pytest.raises(DataError) as err:
        check_sources(_data(corpus, dataset=["alpaca_en_demo", "adgen"]))
    msg = str(err.value)
    assert msg.startswith(f"{corpus / INFO}: dataset 'adgen': hf_hub_url 'HasturOfficial/adgen'")
    assert "needs network (no network: ConnectionError" in msg and 'local "file_name"' in msg and "\n" not in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_hub_entry_offline_mode_is_one_line(corpus, monkeypatch):
    _online(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", _raise(FileNotFoundError("Couldn't find a dataset script")))
    with pytest.raises(DataError) as err:
        read_rows(load_dataset_info(corpus)["adgen"], corpus)
    msg = str(err.value)
    assert "dataset 'adgen'" in msg and "needs network (offline mode: HF_DATASETS_OFFLINE is set)" in msg
    assert "\n" not in msg
    # a split already in the datasets cache still loads offline
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(HUB_ROWS))
    assert read_rows(load_dataset_info(corpus)["adgen"], corpus) == HUB_ROWS


def test_other_load_failures_are_one_line(corpus, monkeypatch):
    _online(monkeypatch)
    monkeypatch.setattr(datasets, "load_dataset", _raise(ValueError("BuilderConfig 'default' not found.\nAvailable")))
    with pytest.raises(DataError, match=r"dataset 'adgen': cannot load hf_hub_url .*\(ValueError: BuilderConfig") as e:
        read_rows(load_dataset_info(corpus)["adgen"], corpus)
    assert "\n" not in str(e.value)


def test_real_datasets_offline_is_one_line(corpus):
    if not datasets.config.HF_HUB_OFFLINE:  # never reach the network from a test
        pytest.skip("needs HF_HUB_OFFLINE=1 set before datasets is imported (tests/conftest.py sets it)")
    with pytest.raises(DataError, match=r"dataset 'adgen': hf_hub_url 'HasturOfficial/adgen' .* needs network"):
        read_rows(load_dataset_info(corpus)["adgen"], corpus)


def test_run_uses_only_its_entries_and_eval_may_repeat_train(corpus, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _raise(AssertionError("no hub entry is used")))
    check_sources(_data(corpus, dataset=["alpaca_en_demo", "identity"], eval_dataset="alpaca_en_demo"))
    with pytest.raises(DataError, match=r"dataset 'dpo_en_demo': a ranking \(preference\) dataset, .* rm / dpo"):
        check_sources(_data(corpus, dataset=["alpaca_en_demo"], eval_dataset="dpo_en_demo"))
    with pytest.raises(ConfigError, match="^dataset lists identity more than once; each domain must appear once$"):
        check_sources(_data(corpus, dataset="identity,identity"))
    with pytest.raises(ConfigError, match="^eval_dataset lists identity more than once"):
        check_sources(_data(corpus, dataset="alpaca_en_demo", eval_dataset="identity,identity"))


def test_eval_set_that_is_a_training_set_is_not_tokenised_twice(corpus, monkeypatch):
    tok = tiny_tokenizer()
    built: list[object] = []
    real = pools_mod.build_dataset_cached

    def counting(cache_dir, **kw):
        built.append(kw["dataset"])
        return real(cache_dir, **kw)

    monkeypatch.setattr(pools_mod, "build_dataset_cached", counting)
    data = _data(
        corpus, dataset=["identity", "alpaca_en_demo"], eval_dataset=["alpaca_en_demo", "identity"], val_size=2
    )
    train, evals = build_pools(data, tok, seed=0)
    assert built == [["identity", "alpaca_en_demo"]]  # the pool only: both eval sets are cut out of it
    assert list(evals) == ["validation", "alpaca_en_demo", "identity"]
    assert len(train) + len(evals["validation"]) == 11
    for name in ("alpaca_en_demo", "identity"):
        alone = build_named([name], data, tok, seed=0)  # what a separate build gives
        assert evals[name].to_dict() == alone.to_dict()
        assert evals[name].features == alone.features and evals[name].column_names == alone.column_names
        assert dataset_metadata(evals[name]) == dataset_metadata(alone)


def test_a_hub_entry_is_tokenised_and_cached_like_a_local_one(corpus, fake_hub, tmp_path):
    """A run that trains on an hf_hub_url entry: its rows go through the template and masking, and the cache key
    is the loaded split's content (a second build is a hit)."""
    from dataflex.data import build_dataset_cached

    tok = tiny_tokenizer()
    kwargs = {"dataset": "adgen,alpaca_en_demo", "dataset_dir": corpus, "tokenizer": tok, "cutoff_len": 64}
    first = build_dataset_cached(tmp_path / "cache", **kwargs)
    assert dataset_metadata(first)["domains"] == ["adgen", "alpaca_en_demo"]
    assert sorted(set(first["domain_id"])) == [0, 1] and first["domain_id"].count(0) == len(HUB_ROWS)
    entries = list((tmp_path / "cache").iterdir())
    again = build_dataset_cached(tmp_path / "cache", **kwargs)
    assert list((tmp_path / "cache").iterdir()) == entries and again["input_ids"] == first["input_ids"]
