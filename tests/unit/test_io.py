"""The catalog's datasets for dataflex artefacts: TrainStates linked into place atomically and verified, JSON lines."""

from __future__ import annotations

import json

import pytest
import torch

from dataflex.core.errors import CheckpointError
from dataflex.io import JSONLinesDataset, TrainStateDataset
from dataflex.train.trainer.state import save_train_state


def _checkpoint(path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_train_state(path, model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={"global_step": 1})
    return path


def test_train_state_is_linked_into_the_catalog_path_and_verified_on_load(tmp_path):
    source = _checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-1")
    dataset = TrainStateDataset(path=str(tmp_path / "rounds" / "round_0"))
    assert not dataset.exists()
    dataset.save({"round": 0, "step": 1, "checkpoint": str(source)})
    loaded = dataset.load()
    target = tmp_path / "rounds" / "round_0" / "checkpoint"
    assert loaded == {"round": 0, "step": 1, "checkpoint": str(target)}
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (target / "trainable.safetensors").stat().st_ino == (source / "trainable.safetensors").stat().st_ino
    assert not list((tmp_path / "rounds" / "round_0").glob(".*.tmp"))  # nothing half-written left behind
    # Saving again (a re-run) replaces the state whole.
    dataset.save({"round": 0, "step": 1, "checkpoint": str(source)})
    assert dataset.load()["checkpoint"] == str(target)


def test_a_truncated_checkpoint_is_refused_and_a_damaged_state_is_not_loaded(tmp_path):
    source = _checkpoint(tmp_path / "ckpt")
    (source / "manifest.json").unlink()  # a kill between the files and the manifest
    dataset = TrainStateDataset(path=str(tmp_path / "state"))
    with pytest.raises(Exception, match="no manifest.json"):
        dataset.save({"round": 0, "checkpoint": str(source)})
    assert not (tmp_path / "state").exists()
    good = _checkpoint(tmp_path / "ckpt2")
    dataset.save({"round": 0, "checkpoint": str(good)})
    (tmp_path / "state" / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(Exception) as err:
        dataset.load()
    assert isinstance(err.value.__cause__ or err.value, CheckpointError)


def test_json_lines_round_trip(tmp_path):
    rows = [{"step": 0, "proportions": [0.5, 0.5]}, {"step": 2, "proportions": [0.7, 0.3]}]
    dataset = JSONLinesDataset(filepath=str(tmp_path / "mixture" / "proportions.jsonl"))
    dataset.save(rows)
    assert dataset.load() == rows
    lines = (tmp_path / "mixture" / "proportions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows


def test_trained_model_is_verified_and_linked_into_place(tmp_path):
    from dataflex.io import TrainedModelDataset

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    dataset = TrainedModelDataset(path=str(tmp_path / "run"))
    with pytest.raises(Exception, match="missing adapter_model.safetensors"):  # Kedro wraps it in DatasetError
        dataset.save({"kind": "adapter", "path": str(adapter), "base_model": "base"})
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    dataset.save({"kind": "adapter", "path": str(adapter), "base_model": "base"})  # in place: only recorded
    assert dataset.load() == {"kind": "adapter", "path": str(adapter), "base_model": "base"}
    elsewhere = TrainedModelDataset(path=str(tmp_path / "catalog"))
    elsewhere.save({"kind": "adapter", "path": str(adapter), "base_model": "base"})
    assert (tmp_path / "catalog" / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert elsewhere.load()["path"] == str(tmp_path / "catalog" / "adapter")
