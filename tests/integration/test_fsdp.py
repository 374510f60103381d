"""FSDP2 on CPU (gloo): sharded training on 2 processes equals 1 process at the same global batch (full fine-tuning
and LoRA), sharded TrainState resumes on another process count, and DeepSpeed ZeRO JSONs map onto it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dataflex.config import DEFAULTS, RunConfig
from dataflex.core.errors import ConfigError
from dataflex.train import run


def _cfg(model_dir, out, processes, finetuning="full", **train):
    model = {"model_name_or_path": str(model_dir), "finetuning_type": finetuning, "lora_rank": 4, "dtype": "fp32"}
    base = {
        **DEFAULTS["train"],
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2 // processes,
        "num_processes": processes,
        "learning_rate": 1e-3,
        "max_steps": 6,
        "logging_steps": 2,
        "progress_bar": False,
    }
    if processes > 1 and "deepspeed" not in train:
        base["fsdp"] = "full_shard auto_wrap"
    return RunConfig.from_params({"model": model, "train": {**base, **train}})


def _weights(out, finetuning="full"):
    if finetuning == "lora":
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return load_file(str(out / "model" / "model.safetensors"))


def _close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_fsdp_on_two_processes_equals_one(finetuning, tiny_model_dir, sft_pool, tmp_path):
    pool = sft_pool.select(range(48))
    for p in (1, 2):
        summary = run.train(_cfg(tiny_model_dir, tmp_path / f"p{p}", p, finetuning), pool, "static")
        assert summary["global_step"] == 6
    _close(_weights(tmp_path / "p1", finetuning), _weights(tmp_path / "p2", finetuning))


def test_a_sharded_checkpoint_resumes_on_one_process(tiny_model_dir, sft_pool, tmp_path):
    """2 sharded processes save TrainStates at steps 3 and 6; 1 process resumes from step 3's (DCP reshards it) and
    ends where an uninterrupted 1-process run ends. A half-written sharded save is never taken for a checkpoint."""
    from dataflex.train.trainer.state import resolve_resume_path

    pool = sft_pool.select(range(48))
    run.train(_cfg(tiny_model_dir, tmp_path / "one", 1), pool, "static")
    run.train(_cfg(tiny_model_dir, tmp_path / "two", 2, save_steps=3), pool, "static")
    checkpoints = tmp_path / "two" / "checkpoints"
    manifest = json.loads((checkpoints / "checkpoint-3" / "manifest.json").read_text())
    assert manifest["sharded_processes"] == 2 and (checkpoints / "checkpoint-3" / "dcp" / ".metadata").is_file()
    (checkpoints / ".checkpoint-9.sharded.tmp" / "dcp").mkdir(parents=True)  # a save killed mid-way
    assert resolve_resume_path("latest", tmp_path / "two") == checkpoints / "checkpoint-6"
    resumed = run.train(
        _cfg(tiny_model_dir, tmp_path / "resumed", 1, resume_from_checkpoint=str(checkpoints / "checkpoint-3")),
        pool,
        "static",
    )
    assert resumed["global_step"] == 6
    _close(_weights(tmp_path / "one"), _weights(tmp_path / "resumed"))

    # a sharded checkpoint missing one rank's file is refused in one line before anything is loaded
    from dataflex.core.errors import CheckpointError
    from dataflex.train.trainer.state import read_manifest

    rank_file = sorted((checkpoints / "checkpoint-3" / "dcp").glob("*.distcp"))[-1]
    rank_file.unlink()
    with pytest.raises(CheckpointError) as err:
        read_manifest(checkpoints / "checkpoint-3")
    assert "\n" not in str(err.value) and "checkpoint-3" in str(err.value)


def test_a_deepspeed_zero3_json_runs_as_fsdp(tiny_model_dir, sft_pool, tmp_path, caplog):
    ds = tmp_path / "ds_z3_config.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "overlap_comm": False}}))
    pool = sft_pool.select(range(48))
    run.train(_cfg(tiny_model_dir, tmp_path / "p1", 1), pool, "static")
    run.train(_cfg(tiny_model_dir, tmp_path / "ds", 2, deepspeed=str(ds)), pool, "static")
    _close(_weights(tmp_path / "p1"), _weights(tmp_path / "ds"))


def test_bad_sharding_settings_are_one_line(tmp_path, tiny_model_dir):
    from dataflex.distributed.fsdp import settings_from_deepspeed

    with pytest.raises(ConfigError, match="num_processes is 1"):
        _cfg(tiny_model_dir, tmp_path, 1, fsdp="full_shard")
    with pytest.raises(ConfigError, match="loss scaler cannot unscale"):
        _cfg(tiny_model_dir, tmp_path, 2, fsdp="full_shard offload", mixed_precision="fp16")
    with pytest.raises(ConfigError, match="unknown option"):
        _cfg(tiny_model_dir, tmp_path, 2, fsdp="hybrid_shard").train.validate()
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        settings_from_deepspeed(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        settings_from_deepspeed(bad)
    z2 = tmp_path / "z2.json"
    z2.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "x": 1}))
    settings = settings_from_deepspeed(z2)
    assert settings.strategy == "shard_grad_op" and settings.offload and "ignored: x" in settings.notes[0]


def _pool(sft_pool):
    # every domain, 24 rows each (the mix modes need every domain present)
    ids = sft_pool["domain_id"]
    rows = [i for d in sorted(set(ids)) for i in [j for j, x in enumerate(ids) if x == d][:24]]
    return sft_pool.select(rows)


def _lora_cfg(model_dir, out, processes, flex, **train):
    cfg = _cfg(model_dir, out, processes, "lora", **train)
    return RunConfig.from_params({**cfg.to_params(), "dataflex": flex})


def test_online_less_on_sharded_processes_selects_what_one_process_selects(tiny_model_dir, sft_pool, tmp_path):
    """Per-sample Adam gradient features computed on the FSDP2-sharded model (the root's embeddings unsharded for
    the input gradient, the Adam moments gathered from their shards) give the same LESS selections."""
    from dataflex.train.modes import select

    pool = _pool(sft_pool)
    dev = {"dev": sft_pool.select(range(100, 106))}
    flex = {
        "train_type": "dynamic_select",
        "component_name": "less",
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        "components": {"selectors": {"less": {"name": "less", "params": {"proj_dim": 64}}}},
    }
    history = {}
    for p in (1, 2):
        result = select.run_all(_lora_cfg(tiny_model_dir, tmp_path / f"p{p}", p, flex, max_steps=-1), pool, dev)
        history[p] = [s["domain_counts"] for s in result["selection_history"]]
    assert history[1] == history[2] and len(history[1]) == 2
    _close(_weights(tmp_path / "p1", "lora"), _weights(tmp_path / "p2", "lora"))


def test_doremi_and_odm_on_sharded_processes_equal_one_process(tiny_model_dir, sft_pool, tmp_path):
    from dataflex.train.modes import mix

    pool = _pool(sft_pool)
    odm = {
        "train_type": "dynamic_mix",
        "component_name": "odm",
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        "components": {"mixers": {"odm": {"name": "odm", "params": {"warmup_steps": 1}}}},
    }
    doremi = {
        "train_type": "dynamic_mix",
        "component_name": "doremi",
        "train_step": 4,
        "components": {
            "mixers": {"doremi": {"name": "doremi", "params": {"reference_model_path": str(tiny_model_dir)}}}
        },
    }
    # DoReMi normalises each micro-batch by its weighted mass (its repository's rule): compare at accumulation 1.
    same_batch = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    for name, flex, run_fn in (("odm", odm, mix.run_all), ("doremi", doremi, mix.run_single_segment)):
        out = {}
        for p in (1, 2):
            batch = same_batch if p == 1 else {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
            cfg = _lora_cfg(tiny_model_dir, tmp_path / name / f"p{p}", p, flex, max_steps=-1, **batch)
            out[p] = run_fn(cfg, pool)
        a = [x for m in out[1]["mixture_history"] for x in m["proportions"]]
        b = [x for m in out[2]["mixture_history"] for x in m["proportions"]]
        assert a == pytest.approx(b, abs=1e-6), name
        if name == "doremi":  # the proxy's averaged domain weights: what DoReMi is for
            weights = out[1]["doremi"]["average_weights"]
            assert weights == pytest.approx(out[2]["doremi"]["average_weights"], abs=1e-6)
            assert max(weights) - min(weights) > 1e-4, "the weights moved from uniform"
        _close(_weights(tmp_path / name / "p1", "lora"), _weights(tmp_path / name / "p2", "lora"))


def test_load_best_model_at_end_on_sharded_processes(tiny_model_dir, sft_pool, tmp_path):
    """The best TrainState of a sharded run is DCP shards; the saved adapter is that model, reassembled."""
    from dataflex.distributed.fsdp import read_sharded

    pool = sft_pool.select(range(48))
    evals = {"dev": sft_pool.select(range(48, 56))}
    train = {
        "eval_strategy": "steps",
        "eval_steps": 2,
        "early_stopping_steps": 1,
        "early_stopping_min_delta": 100.0,
        "load_best_model_at_end": True,
    }
    summary = run.train(_cfg(tiny_model_dir, tmp_path / "p2", 2, "lora", **train), pool, "static", eval_sets=evals)
    assert summary["best_step"] == 2 and summary["stopped_early_at"] == 4
    best = tmp_path / "p2" / "best"
    manifest = json.loads((best / "manifest.json").read_text())
    expected = read_sharded(best, manifest["trainable"], "model")
    saved = _weights(tmp_path / "p2", "lora")
    assert len(saved) == len(expected)
    for name, tensor in expected.items():
        assert torch.equal(saved[name.replace(".default", "")], tensor), name


def test_the_less_warmup_and_features_on_sharded_processes(tiny_model_dir, sft_pool, tmp_path):
    """The `less` pipeline's warm-up writes sharded TrainStates; its checkpoint features read the adapter and the
    Adam moments back from the DCP shards and equal those of a 1-process warm-up (to fp32 noise)."""
    from dataflex.features import GradientDatastore
    from dataflex.train.modes import less

    pool = _pool(sft_pool)
    feats = {}
    for p in (1, 2):
        out = tmp_path / f"p{p}"
        cfg = _lora_cfg(tiny_model_dir, out, p, {}, max_steps=-1)
        less_cfg = {**DEFAULTS["less"], "datastore_dir": str(out / "ds"), "warmup_dir": str(out / "wu"), "proj_dim": 64}
        cfg = RunConfig.from_params({**cfg.to_params(), "less": less_cfg})
        warm = less.warmup(cfg, pool, 0.5, 2, str(out / "wu"))
        ref = less.checkpoint_features(cfg, pool, warm, 1, "train", "pool", False)
        feats[p] = GradientDatastore.load(ref).features
    assert json.loads((tmp_path / "p2" / "wu").rglob("manifest.json").__next__().read_text())["sharded_processes"] == 2
    assert torch.allclose(feats[1], feats[2], rtol=1e-4, atol=1e-3 * float(feats[1].abs().max()) * 1e-2)
