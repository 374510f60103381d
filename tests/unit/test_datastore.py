"""The gradient datastore: resume after a kill, content-addressed misses, partial reuse by sample hash."""

from __future__ import annotations

import json

import pytest
import torch
from test_features import ALL, moments, samples, tiny_lora

import dataflex.features.datastore as ds_mod
from dataflex.core.errors import ConfigError, DataError
from dataflex.features import FeatureSettings, GradientDatastore, per_sample_gradient_features

SGD = FeatureSettings(gradient_type="sgd", projector="sjlt", proj_dim=32, seed=1)


class Killed(RuntimeError):
    pass


def counting(monkeypatch: pytest.MonkeyPatch, fail_on_call: int | None = None) -> list[int]:
    """Count (and optionally kill) calls of the extractor the datastore uses; each call is one shard's samples."""
    calls: list[int] = []
    real = ds_mod.per_sample_gradient_features

    def wrapped(model, dataset, **kw):
        calls.append(len(dataset))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise Killed("worker killed")
        return real(model, dataset, **kw)

    monkeypatch.setattr(ds_mod, "per_sample_gradient_features", wrapped)
    return calls


def test_kill_and_rerun_reuses_completed_shards(tmp_path, monkeypatch):
    model = tiny_lora(ALL)
    rows = samples(10, equal=False, seed=3)
    store = GradientDatastore(tmp_path / "store", shard_size=4)  # shards of 4, 4, 2 samples
    counting(monkeypatch, fail_on_call=2)
    with pytest.raises(Killed):
        store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    ref_dirs = list((tmp_path / "store").glob("*/*"))
    manifest = json.loads((ref_dirs[0] / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["0"] and not manifest["complete"]
    assert not list(ref_dirs[0].glob("*.tmp")), "no half-written file is left behind"
    with pytest.raises(DataError, match="incomplete"):
        GradientDatastore.load(ref_dirs[0])

    calls = counting(monkeypatch)
    ref = store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    assert calls == [4, 2], "the completed first shard is not recomputed"
    assert ref["status"] == "resumed"
    got = GradientDatastore.load(ref)
    uninterrupted = GradientDatastore(tmp_path / "clean", shard_size=4).extract(
        model, rows, SGD, base_model_id="tiny", progress=False
    )
    assert torch.equal(got.features, GradientDatastore.load(uninterrupted).features)
    # One batch over all rows pads differently than per-shard batches: equal up to fp32 summation order.
    whole = per_sample_gradient_features(model, rows, projector="sjlt", proj_dim=32, seed=1)
    assert torch.allclose(got.features, whole, atol=1e-6)
    assert torch.allclose(got.norms, whole.norm(dim=1), atol=1e-6)

    calls = counting(monkeypatch)
    again = store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    assert calls == [] and again["status"] == "hit" and again["path"] == ref["path"]


def test_changed_adapter_or_setting_is_a_miss(tmp_path, monkeypatch):
    model = tiny_lora(ALL)
    rows = samples(5, equal=False, seed=4)
    store = GradientDatastore(tmp_path, shard_size=8)
    first = store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    calls = counting(monkeypatch)
    other_dim = store.extract(model, rows, FeatureSettings(proj_dim=16, seed=1), base_model_id="tiny", progress=False)
    other_seed = store.extract(model, rows, FeatureSettings(proj_dim=32, seed=2), base_model_id="tiny", progress=False)
    other_base = store.extract(model, rows, SGD, base_model_id="another-base", progress=False)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1e-3)
    other_weights = store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    assert calls == [5, 5, 5, 5]
    paths = {r["path"] for r in (first, other_dim, other_seed, other_base, other_weights)}
    assert len(paths) == 5


def test_adam_key_covers_the_moments(tmp_path, monkeypatch):
    model = tiny_lora(ALL)
    rows = samples(3, equal=True, seed=5)
    store = GradientDatastore(tmp_path)
    adam = FeatureSettings(gradient_type="adam", proj_dim=32)
    state = moments(model)
    a = store.extract(model, rows, adam, base_model_id="tiny", optimizer_state=state, progress=False)
    state[next(iter(state))]["exp_avg"] += 1e-4
    b = store.extract(model, rows, adam, base_model_id="tiny", optimizer_state=state, progress=False)
    assert a["path"] != b["path"] and b["status"] == "computed"


def test_a_new_dataset_reuses_rows_it_shares_with_a_stored_one(tmp_path, monkeypatch):
    model = tiny_lora(ALL)
    rows = samples(8, equal=False, seed=6)
    store = GradientDatastore(tmp_path, shard_size=3)
    store.extract(model, rows[:6], SGD, base_model_id="tiny", progress=False)
    calls = counting(monkeypatch)
    ref = store.extract(model, rows[2:], SGD, base_model_id="tiny", progress=False)  # 4 known rows, 2 new
    assert sum(calls) == 2 and ref["reused_samples"] == 4 and ref["computed_samples"] == 2
    expected = per_sample_gradient_features(model, rows[2:], projector="sjlt", proj_dim=32, seed=1)
    assert torch.allclose(GradientDatastore.load(ref).features, expected, atol=1e-6)


def test_empty_or_invalid_input_is_an_error(tmp_path):
    store = GradientDatastore(tmp_path)
    with pytest.raises(DataError, match="empty"):
        store.extract(tiny_lora(ALL), [], SGD, base_model_id="tiny", progress=False)
    with pytest.raises(DataError, match="not a gradient feature store"):
        GradientDatastore.load(tmp_path)


def test_stale_temp_files_of_a_killed_write_are_removed_on_the_next_start(tmp_path, monkeypatch):
    model = tiny_lora(ALL)
    rows = samples(6, equal=False, seed=5)
    store = GradientDatastore(tmp_path, shard_size=4)
    counting(monkeypatch, fail_on_call=2)
    with pytest.raises(Killed):
        store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    entry = next(tmp_path.glob("*/*"))
    # what a kill -9 between a shard's write and its rename leaves
    (entry / ".shard-00001.safetensors.1234.tmp").write_bytes(b"half a shard")
    counting(monkeypatch)
    ref = store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    assert ref["status"] == "resumed"
    assert not list(entry.glob(".*.tmp")), "the stale temp file is gone after the resumed extraction"


def test_a_second_extraction_of_the_same_entry_waits_for_the_first(tmp_path, monkeypatch):
    """Two runs filling one entry: the second blocks on the entry's lock, then finds the shards done (a hit)."""
    import threading

    from dataflex.utils.lock import RunLock

    model = tiny_lora(ALL)
    rows = samples(5, equal=False, seed=6)
    store = GradientDatastore(tmp_path, shard_size=8)
    first = store.extract(model, rows, SGD, base_model_id="tiny", progress=False)
    entry = first["path"]
    holder = RunLock(entry, wait=False).acquire()  # another process mid-write holds the entry
    result: dict = {}
    waiter = threading.Thread(
        target=lambda: result.update(store.extract(model, rows, SGD, base_model_id="tiny", progress=False))
    )
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive(), "the second extraction waits while the entry is locked"
    holder.release()
    waiter.join(timeout=60)
    assert result["status"] == "hit" and result["path"] == entry


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_streamed_matching_equals_in_memory_matching(tmp_path, aggregation):
    """LESS matching streamed shard by shard (bounded memory) equals matching the loaded matrices, to 1e-6."""
    from dataflex.features import less_scores, streamed_less_scores

    rows = samples(11, equal=False, seed=7)
    stores, pools = [], []
    for c in range(2):  # two checkpoints: two adapters
        model = tiny_lora(ALL)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01 * (c + 1))
        ref = GradientDatastore(tmp_path / f"c{c}", shard_size=3).extract(model, rows, SGD, progress=False)
        stores.append(ref)
        pools.append(GradientDatastore.load(ref).features)
    gen = torch.Generator().manual_seed(0)
    targets = {
        "a": ([torch.randn(5, 32, generator=gen) for _ in range(2)], [0, 0, 1, 1, 1]),
        "b": ([torch.randn(2, 32, generator=gen) for _ in range(2)], [0, 0]),
    }
    lrs = [2e-4, 1e-4]
    streamed = streamed_less_scores(stores, targets, lrs, aggregation)
    for name, (feats, subtasks) in targets.items():
        expected = less_scores(pools, feats, lrs, subtasks, aggregation)
        assert (streamed[name] - expected).abs().max() <= 1e-6, name


def test_a_dense_projector_too_large_for_memory_is_one_line():
    from dataflex.features.projectors import Projector

    with pytest.raises(ConfigError, match="use projector: sjlt"):
        Projector("rademacher", [("w", 500_000_000)], proj_dim=8192)
