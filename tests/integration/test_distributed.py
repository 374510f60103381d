"""Scale-out on CPU (gloo): every mode on 2 accelerate worker processes equals 1 process with the same global
batch (B x A x processes), and a killed worker fails the node cleanly and a re-run resumes.
(Sharing arithmetic and launch-config checks are in tests/unit/test_distributed_launch.py.)"""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from conftest import lora_model_params, train_params
from safetensors.torch import load_file

from dataflex.config import DEFAULTS, RunConfig
from dataflex.distributed import WorkerError
from dataflex.train import run
from dataflex.train.modes import mix, select


def _model(tiny_model_dir):
    return lora_model_params(tiny_model_dir)


def _train(out, processes, **kw):
    """Global batch 8 either way: 1 process x B 4 x A 2, or 2 processes x B 4 x A 1."""
    return train_params(out, gradient_accumulation_steps=2 // processes, num_processes=processes, **kw)


def _cfg(model, train, flex=None):
    return RunConfig.from_params({"model": model, "train": train, "dataflex": flex or {}})


def train_model(pool, model, train, flex=None, metrics_sink=None):
    """A one-segment run (static or dynamic_weight) through the run core."""
    mode = (flex or {}).get("train_type", "static")
    return run.train(_cfg(model, train, flex), pool, mode, metrics_sink=metrics_sink)


def _adapter(result_dir):
    return load_file(str(result_dir / "adapter" / "adapter_model.safetensors"))


def _close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


def test_static_training_on_two_processes_equals_one(tiny_model_dir, sft_pool, tmp_path):
    # 57 samples, global batch 8: the last step has one sample, so process 1 runs a zero-weight pass.
    pool = sft_pool.select(range(57))
    logs = {1: [], 2: []}
    results = {
        p: train_model(
            pool,
            _model(tiny_model_dir),
            _train(tmp_path / f"p{p}", p),
            metrics_sink=lambda m, s, p=p: logs[p].append((s, m["loss"])),
        )
        for p in (1, 2)
    }
    assert results[1]["global_step"] == results[2]["global_step"] == 8
    assert results[1]["train_samples_seen"] == results[2]["train_samples_seen"] == 57
    _close(_adapter(tmp_path / "p1"), _adapter(tmp_path / "p2"))
    assert [s for s, _ in logs[2]] == [s for s, _ in logs[1]]  # metrics come back from the workers, logged here
    assert [v for _, v in logs[2]] == pytest.approx([v for _, v in logs[1]], rel=1e-5)
    assert not (tmp_path / "p2" / ".workers").exists() or not any((tmp_path / "p2" / ".workers").iterdir())


def test_weighting_on_two_processes_normalises_over_both(tiny_model_dir, sft_pool, tmp_path):
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_weight",
        "component_name": "loss",
        "warmup_step": 1,
        "train_step": 5,
    }
    results = {p: train_model(sft_pool, _model(tiny_model_dir), _train(tmp_path / f"p{p}", p), flex) for p in (1, 2)}
    _close(_adapter(tmp_path / "p1"), _adapter(tmp_path / "p2"))
    weighted = {p: [h["weighted_loss"] for h in r["log_history"] if "weighted_loss" in h] for p, r in results.items()}
    assert weighted[1] and weighted[2] == pytest.approx(weighted[1], rel=1e-5)


def test_odm_on_two_processes_keeps_one_bandit_state(tiny_model_dir, sft_pool, tmp_path):
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_mix",
        "component_name": "odm",
        "train_step": 6,
        "components": {
            "mixers": {"odm": {"name": "odm", "params": {"warmup_steps": 1, "alpha": 0.5, "reward_scale": 2.0}}}
        },
    }
    states = {}
    for p in (1, 2):
        cfg = _cfg(_model(tiny_model_dir), _train(tmp_path / f"p{p}", p), flex)
        result = mix.run_single_segment(cfg, sft_pool)
        states[p] = json.loads((tmp_path / f"p{p}" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
        assert result["global_step"] == 6
    odm = {p: s["components"]["mixer"] for p, s in states.items()}
    assert odm[1]["rewards"] != [0.0, 0.0, 0.0]
    assert odm[2]["rewards"] == pytest.approx(odm[1]["rewards"], rel=1e-6)
    assert states[2]["plan"]["manager"] == states[1]["plan"]["manager"]  # the same draws, the same proportions
    _close(_adapter(tmp_path / "p1"), _adapter(tmp_path / "p2"))


def test_online_less_on_two_processes_selects_the_same_and_shares_the_datastore(
    demo_dir, tiny_model_dir, sft_pool, tokenizer, tmp_path
):
    from dataflex.data import build_dataset
    from dataflex.features import GradientDatastore

    evals = {
        "arith_dev": build_dataset(
            dataset=["arith_dev"],
            dataset_dir=demo_dir,
            tokenizer=tokenizer,
            template="default",
            cutoff_len=64,
            stage="sft",
        )
    }
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": "less",
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 1,
        "components": {"selectors": {"less": {"name": "less", "params": {"proj_dim": 512, "batch_size": 8}}}},
    }
    runs = {
        p: select.run_all(_cfg(_model(tiny_model_dir), _train(tmp_path / f"p{p}", p), flex), sft_pool, evals)
        for p in (1, 2)
    }
    for sel1, sel2 in zip(*(r["selection_history"] for r in runs.values())):
        assert sel1["domain_counts"] == sel2["domain_counts"]
    one, two = (json.loads((tmp_path / f"p{p}" / "selections" / "step_2.json").read_text()) for p in (1, 2))
    assert one["indices"] == two["indices"] and len(one["indices"]) == 16
    stores = {
        p: sorted((tmp_path / f"p{p}" / "selector_cache" / "datastore").glob("*/*/manifest.json")) for p in (1, 2)
    }
    assert len(stores[1]) == len(stores[2]) == 2  # pool and target at the selection
    for a, b in zip(stores[1], stores[2]):
        fa, fb = GradientDatastore.load(a.parent), GradientDatastore.load(b.parent)
        assert a.parent.relative_to(tmp_path / "p1") == b.parent.relative_to(tmp_path / "p2")  # same content keys
        assert fa.features.shape == fb.features.shape
        # every row, each exactly once; equal up to fp32 summation order (batches are composed differently)
        rel = (fa.features - fb.features).norm(dim=1) / fa.features.norm(dim=1)
        assert float(rel.max()) < 1e-5
    _close(_adapter(tmp_path / "p1"), _adapter(tmp_path / "p2"), atol=1e-5)


def _features_and_selection_on_1_and_2_processes(selector, params, sft_pool, evals, tiny_model_dir, tmp_path):
    """Train round 0 once, then compute the selector's features and selection from that state with 1 and with 2
    processes (caches removed in between): {processes: (features, indices)}."""
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": selector,
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 1,
        "components": {"selectors": {selector: {"name": selector, "params": params}}},
    }
    out, model = tmp_path / "out", _model(tiny_model_dir)
    state = select.train_segment(_cfg(model, _train(out, 1), flex), sft_pool, evals, 0)
    results = {}
    for p in (1, 2):
        shutil.rmtree(out / "selector_cache", ignore_errors=True)
        shutil.rmtree(out / "selections", ignore_errors=True)
        feats, sel = select.select_round(_cfg(model, _train(out, p), flex), sft_pool, evals, state)
        assert not feats["features"]["cache_hit"]
        results[p] = (feats["features"], sel["indices"])
    assert results[1][1] == results[2][1] and len(results[1][1]) == 16  # the same selection
    return results


def test_pool_losses_on_two_processes_equal_one_and_the_loss_selector_picks_the_same(
    tiny_model_dir, sft_pool, tmp_path
):
    runs = _features_and_selection_on_1_and_2_processes(
        "loss", {"focus": "high", "replacement": False}, sft_pool, None, tiny_model_dir, tmp_path
    )
    one, two = runs[1][0]["losses"], runs[2][0]["losses"]
    assert len(two) == len(sft_pool) and two == pytest.approx(one, rel=1e-5)  # every row once, in order


def test_embeddings_on_two_processes_equal_one_and_near_picks_the_same(
    demo_dir, tiny_model_dir, sft_pool, tokenizer, tmp_path
):
    from dataflex.data import build_dataset
    from dataflex.features.embeddings import EmbeddingStore

    evals = {
        "arith_dev": build_dataset(
            dataset=["arith_dev"],
            dataset_dir=demo_dir,
            tokenizer=tokenizer,
            template="default",
            cutoff_len=64,
            stage="sft",
        )
    }
    runs = _features_and_selection_on_1_and_2_processes(
        "near", {"encoder": "model", "max_K": 20}, sft_pool, evals, tiny_model_dir, tmp_path
    )
    one, two = (EmbeddingStore.load(runs[p][0]["pool"]) for p in (1, 2))
    assert two.shape == (len(sft_pool), one.shape[1]) and torch.allclose(two, one, atol=1e-5)  # every row, in order


KILLER = textwrap.dedent('''
    """A weighter whose process 1 is killed once at step 2 (the marker file makes it happen only once)."""
    import os
    import signal
    from pathlib import Path

    from dataflex.core.registry import register_weighter
    from dataflex.train.weighter.base_weighter import Weighter


    @register_weighter("killer")
    class KillerWeighter(Weighter):
        def __init__(self, marker: str, accelerator=None, **kwargs):
            super().__init__(**kwargs)
            self.marker, self.rank = Path(marker), getattr(accelerator, "process_index", 0)

        def get_weighted_loss(self, losses, *, ctx=None, model=None, inputs=None):
            if ctx.global_step == 2 and self.rank == 1 and not self.marker.exists():
                self.marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            return losses.mean()
''')


def test_a_killed_worker_fails_the_node_cleanly_and_a_rerun_resumes(tiny_model_dir, sft_pool, tmp_path):
    module = tmp_path / "killer.py"
    module.write_text(KILLER)
    marker = tmp_path / "killed.txt"
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_weight",
        "component_name": "killer",
        "train_step": 4,
        "user_modules": [str(module)],
        "components": {"weighters": {"killer": {"name": "killer", "params": {"marker": str(marker)}}}},
    }
    train = _train(tmp_path / "out", 2, save_steps=1, resume_from_checkpoint=True)
    with pytest.raises(WorkerError, match=r"failed on 2 processes: a worker was killed by SIGKILL; full log: ") as err:
        train_model(sft_pool, _model(tiny_model_dir), train, flex)
    assert "\n" not in str(err.value) and marker.exists()
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and not (out / "train_result.json").exists()  # nothing half-written
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "checkpoints" / "checkpoint-3").exists()
    result = train_model(sft_pool, _model(tiny_model_dir), train, flex)  # resumes from checkpoint-2
    assert result["global_step"] == 4 and (out / "adapter").is_dir()
    assert [h["step"] for h in result["log_history"] if "loss" in h] == [2, 4]
