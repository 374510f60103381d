"""`dataflex-cli offline-select near|tsds`: DataFlex's file names, shapes and dtypes, one-line errors, and the files
equal to what the `near` / `tsds` selectors compute themselves on the same pool and target (the test-size model as
the embedding model)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dataflex.core.errors import ConfigError, DataError, DataFlexError
from dataflex.offline_select import add_parser, cmd_offline_select, offline_select

DOMAINS = ["arith_train", "reverse_train", "sort_train"]


def _files(demo_dir, names):
    return [str(demo_dir / f"{n}.json") for n in names]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dataflex-cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def target(demo_dir, tokenizer):
    from dataflex.data import build_dataset

    return build_dataset(
        dataset=["arith_dev"], dataset_dir=demo_dir, tokenizer=tokenizer, template="default", cutoff_len=64, stage="sft"
    )


@pytest.mark.parametrize("method", ["near", "tsds"])
def test_offline_file_equals_what_the_selector_computes_itself(
    method, demo_dir, sft_pool, target, untrained_model_dir, tmp_path
):
    from dataflex.core.registry import REGISTRY

    model = str(untrained_model_dir)
    params = {"max_K": 40} if method == "near" else {"max_K": 120, "kde_K": 30, "C": 1.0}
    ns = _parse(
        [
            "offline-select",
            method,
            "--candidates",
            *_files(demo_dir, DOMAINS),
            "--queries",
            *_files(demo_dir, ["arith_dev"]),
            "--output",
            str(tmp_path / "out"),
            "--embedding-model",
            model,
            "--tokenizer",
            model,
            "--template",
            "default",
            "--cutoff-len",
            "64",
            "--max-K",
            str(params["max_K"]),
            *(["--kde-K", "30", "--C", "1.0"] if method == "tsds" else []),
        ]
    )
    assert ns.func(ns) == 0
    name = "top_indices.npy" if method == "near" else "tsds_probs.npy"
    written = np.load(tmp_path / "out" / name)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # atomic: no temp file left behind

    runtime = {"dataset": sft_pool, "accelerator": None, "data_collator": None, "cache_dir": str(tmp_path / "c")}
    computing = REGISTRY.build(
        "selector",
        method,
        runtime={**runtime, "eval_dataset": target},
        cfg={"encoder": model, "tokenizer_path": model, **params},
    )
    feats = computing.compute_features(None, 0)
    key = "indices_path" if method == "near" else "probs_path"
    loading = REGISTRY.build("selector", method, runtime=runtime, cfg={key: str(tmp_path / "out" / name)})
    if method == "near":
        from dataflex.train.selector.embedding_common import load_neighbors

        _, idx = load_neighbors(feats["neighbors"])
        assert written.dtype == np.int64 and written.shape == (len(target), 40)
        np.testing.assert_array_equal(written, idx)
    else:
        from safetensors.torch import load_file

        assert written.dtype == np.float64 and written.shape == (len(sft_pool),)
        assert written.sum() == pytest.approx(1.0)
        np.testing.assert_array_equal(written, load_file(feats["probs"]["path"])["probs"].numpy())
    for step, k in ((0, 10), (3, 25)):
        assert loading.select(None, step, k) == computing.select(None, step, k, features=feats)


def test_dataflex_text_mode_and_default_queries(demo_dir, untrained_model_dir, tmp_path):
    # No --tokenizer: DataFlex's "Instruction: ... Output: ..." texts over file rows; no --queries: the first 100.
    path = offline_select(
        "near",
        _files(demo_dir, DOMAINS),
        tmp_path,
        embedding_model=str(untrained_model_dir),
        max_K=5,
    )
    idx = np.load(path)
    assert path.name == "top_indices.npy" and idx.dtype == np.int64 and idx.shape == (100, 5)
    assert (idx[:, 0] == np.arange(100)).all()  # a query that is a candidate is its own nearest neighbour
    probs = np.load(
        offline_select("tsds", _files(demo_dir, DOMAINS), tmp_path, embedding_model=str(untrained_model_dir), C=1.0)
    )
    n = sum(len(json.loads((demo_dir / f"{d}.json").read_text())) for d in DOMAINS)
    assert probs.dtype == np.float64 and probs.shape == (n,) and probs.sum() == pytest.approx(1.0)


def test_bad_input_is_one_line(demo_dir, untrained_model_dir, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "bad.json").write_text('[{"instruction": "a", ')
    (tmp_path / "chat.jsonl").write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n')
    good = _files(demo_dir, ["arith_dev"])
    model = str(untrained_model_dir)
    cases = [
        ({"candidates": [str(tmp_path / "missing.json")]}, DataError, "candidates file .* not found"),
        ({"candidates": [str(tmp_path / "empty.json")]}, DataError, "has no rows"),
        ({"candidates": [str(tmp_path / "bad.json")]}, DataError, "malformed JSON"),
        ({"candidates": [str(tmp_path / "chat.jsonl")]}, DataError, "reads Alpaca rows"),
        ({"candidates": good, "queries": [str(tmp_path / "empty.json")]}, DataError, "queries file .* no rows"),
        ({"candidates": good, "embedding_model": "model"}, ConfigError, "has no training model"),
        ({"candidates": good, "embedding_model": "/no/such/encoder"}, ConfigError, "never download"),
        ({"candidates": good, "template": "default"}, ConfigError, "need --tokenizer"),
        ({"candidates": good, "max_K": 0}, ConfigError, "max_K must be an integer >= 1"),
        ({"candidates": good, "method": "tsds", "alpha": 1.5}, ConfigError, "alpha must be"),
        ({"candidates": good, "method": "lsh"}, ConfigError, "method must be one of"),
        ({"candidates": good, "output": str(tmp_path / "empty.json")}, ConfigError, "is a file, not a folder"),
    ]
    for kwargs, error, message in cases:
        kwargs = {"method": "near", "output": str(tmp_path / "o"), "embedding_model": model, **kwargs}
        with pytest.raises(error, match=message) as err:
            offline_select(kwargs.pop("method"), kwargs.pop("candidates"), kwargs.pop("output"), **kwargs)
        assert "\n" not in str(err.value)
    ns = _parse(["offline-select", "near", "--candidates", *good, "--output", str(tmp_path), "--C", "2"])
    with pytest.raises(DataFlexError, match="near does not take --C"):
        cmd_offline_select(ns)
    assert not (tmp_path / "o").exists()
