"""The dynamic_moe mixer training a tiny MoE (Mixtral, 4 experts, top-2): freeze_gate leaves the routers
bit-identical while the experts train, a run interrupted mid-round and resumed equals the uninterrupted run,
2 processes give the weights of 1, mixer_eval_dataset reaches the mixer (a mixer records which set it evaluated
on), and DataFlex's own dynamic_moe_mixer.yaml runs through dataflex-cli with only the model, data and step counts
swapped. (The update formula, gate-load extraction and errors are in tests/unit/test_dynamic_moe.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dataflex.config import DEFAULTS, RunConfig
from dataflex.core.registry import register_mixer
from dataflex.data.pools import build_mixer_eval_sets
from dataflex.train.mixer import Mixer
from dataflex.train.mixer.dynamic_moe_mixer import DynamicMoEMixer
from dataflex.train.modes import mix

EVAL_SETS = "arith_dev,reverse_dev,sort_dev"
SMALL = {"eval_samples": 8, "collect_steps": 2, "eval_batch_size": 4}  # 40-row domains: 8 held out, 8 rows read


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, demo_dir: Path) -> Path:
    """The test-size tiny MoE, briefly pre-trained so its routing differs between the demo's domains."""
    from dataflex.train.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("moe") / "tiny_moe"
    return make_tiny_model(
        out,
        demo_dir,
        size="test",
        arch="moe",
        seed=0,
        pretrain_steps=60,
        block_size=64,
        batch_size=8,
        progress_bar=False,
    )


def _cfg(out: Path, moe_dir: Path, processes: int = 1, params: dict | None = None, **flex: Any) -> RunConfig:
    model = {**DEFAULTS["model"], "model_name_or_path": str(moe_dir), "finetuning_type": "full", "freeze_gate": True}
    train = {
        **DEFAULTS["train"],
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2 // processes,
        "num_processes": processes,
        "learning_rate": 2e-3,
        "logging_steps": 2,
        "progress_bar": False,
        "seed": 42,
    }
    dataflex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_mix",
        "component_name": "dynamic_moe",
        "components": {"mixers": {"dynamic_moe": {"name": "dynamic_moe", "params": params or SMALL}}},
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        **flex,
    }
    data = {**DEFAULTS["data"], "dataset": "arith_train,reverse_train,sort_train", "cutoff_len": 64}
    return RunConfig.from_params({"model": model, "train": train, "dataflex": dataflex, "data": data})


def _gate(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.endswith(".gate.weight")}  # saved as block_sparse_moe.gate


def test_a_run_updates_the_mixture_from_gate_loads_with_the_routers_frozen(moe_dir, sft_pool, tmp_path):
    out = tmp_path / "run"
    result = mix.run_all(_cfg(out, moe_dir), sft_pool)
    assert result["global_step"] == 6
    history = result["mixture_history"]
    assert [h["step"] for h in history] == [0, 2, 4] and history[0]["proportions"] == pytest.approx([1 / 3] * 3)
    for line in history[1:]:
        loads = np.asarray(line["stats"]["gate_loads"])
        assert loads.shape == (3, 4) and np.allclose(loads.sum(axis=1), 1.0)
        assert line["proportions"] == pytest.approx(line["stats"]["weights"]) and sum(line["proportions"]) == 1
    # Round 1's weights come from uniform, round 2's from round 1's: the state crossed the round boundary.
    from dataflex.train.mixer.dynamic_moe_mixer import dynamic_sampling_update

    w2 = dynamic_sampling_update(
        np.asarray(history[2]["stats"]["gate_loads"]), np.asarray(history[1]["proportions"]), 10, 0.05
    )
    assert history[2]["proportions"] == pytest.approx(w2[0].tolist())
    lines = (out / "dynamic_moe_weights.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4]
    assert (out / "mixture" / "expert_loads.png").stat().st_size > 1000

    before, after = load_file(str(moe_dir / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert _gate(before) and all(torch.equal(before[k], after[k]) for k in _gate(before))  # bit-identical routers
    changed = [k for k in before if "experts" in k and not torch.equal(before[k], after[k])]
    assert len(changed) >= 6  # while the experts trained (those that received tokens; all 3 matrices of each)


def test_resume_mid_run_equals_the_uninterrupted_run(moe_dir, sft_pool, tmp_path, monkeypatch):
    """A run killed in the middle of round 1 (after its step 3, with checkpoints every step) and resumed the way
    the pipeline resumes a failed round (re-run from the round's input state, in fresh objects, the round files
    read back from JSON) ends as the uninterrupted run: the same mixtures, gate loads and weights."""
    from dataclasses import replace

    def cfg(out):
        c = _cfg(out, moe_dir)
        return replace(c, train=replace(c.train, save_steps=1))

    whole = mix.run_all(cfg(tmp_path / "whole"), sft_pool)

    def killed(self, ctx, logs):
        if ctx.global_step == 3:
            raise KeyboardInterrupt

    c = cfg(tmp_path / "resumed")
    reread = lambda x: json.loads(json.dumps(x))  # noqa: E731  # what the catalog's JSON files give back
    state0 = reread(mix.train_segment(c, sft_pool, 0))
    mixture1 = reread(mix.compute_mixture(c, sft_pool, state0))
    monkeypatch.setattr(DynamicMoEMixer, "on_step_end", killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        mix.train_segment(c, sft_pool, 1, state0, mixture1)
    monkeypatch.undo()
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2").is_dir()
    state1 = reread(mix.train_segment(c, sft_pool, 1, state0, mixture1))
    mixture2 = reread(mix.compute_mixture(c, sft_pool, state1))
    resumed = mix.finalize(mix.train_segment(c, sft_pool, 2, state1, mixture2), [mixture1, mixture2])

    assert resumed["global_step"] == whole["global_step"] == 6
    for a, b in zip(whole["mixture_history"], resumed["mixture_history"], strict=True):
        assert a["step"] == b["step"] and b["proportions"] == pytest.approx(a["proportions"], abs=1e-12)
        assert (a.get("stats") or {}).get("gate_loads") == (b.get("stats") or {}).get("gate_loads")
    one = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-6
    lines = (tmp_path / "resumed" / "dynamic_moe_weights.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4]


@register_mixer("eval_recorder")
class EvalRecorder(Mixer):
    """Records which set it evaluated on for each domain (the set's own dataset_info name, from its metadata)."""

    def __init__(self, mixture_manager: Any, mixer_eval_dataset: Any = None) -> None:
        super().__init__(mixture_manager)
        self.sets = mixer_eval_dataset
        self.seen: dict[str, Any] = {}

    def mix(self, model: torch.nn.Module, step_id: int, **kwargs: Any) -> np.ndarray:
        assert self.mixture_manager.mixer_eval_datasets is self.sets  # DataFlex's name for the same sets
        self.seen = {d: [json.loads(s.info.description)["domains"][0], len(s)] for d, s in self.sets.items()}
        return self.mixture_manager.proportions.copy()

    def stats(self) -> dict[str, Any]:
        return {"evaluated_on": self.seen}


def test_mixer_eval_dataset_reaches_a_mixer_that_records_which_set_it_evaluated_on(
    moe_dir, demo_dir, sft_pool, tokenizer, tmp_path
):
    cfg = _cfg(tmp_path / "rec", moe_dir, component_name="eval_recorder", update_times=1, mixer_eval_dataset=EVAL_SETS)
    from dataclasses import replace

    data = replace(cfg.data, dataset_dir=str(demo_dir), cache_dir=str(tmp_path / "cache"))
    sets = build_mixer_eval_sets(data, EVAL_SETS, tokenizer, seed=42)
    assert list(sets) == EVAL_SETS.split(",")
    result = mix.run_all(cfg, sft_pool, mixer_eval_sets=sets)
    seen = result["mixture_history"][1]["stats"]["evaluated_on"]
    assert seen == {"arith_train": ["arith_dev", 8], "reverse_train": ["reverse_dev", 8], "sort_train": ["sort_dev", 8]}

    # dynamic_moe on the given sets: nothing is held out of training, and its state says where it measured.
    cfg = _cfg(tmp_path / "moe", moe_dir, update_times=1, mixer_eval_dataset=EVAL_SETS, params={"collect_steps": 1})
    mix.run_all(cfg, sft_pool, mixer_eval_sets=sets)
    state = json.loads((tmp_path / "moe" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["plan"]["manager"]["held_out"] == ""
    assert state["components"]["mixer"]["eval_source"] == "mixer_eval_dataset"
    assert all(len(rows) == 8 for rows in state["components"]["mixer"]["eval_rows"].values())


def test_two_processes_give_the_same_weights_as_one(moe_dir, sft_pool, tmp_path):
    results = {p: mix.run_all(_cfg(tmp_path / f"p{p}", moe_dir, p, update_times=1), sft_pool) for p in (1, 2)}
    one, two = (results[p]["mixture_history"] for p in (1, 2))
    assert len(one) == len(two) == 2
    np.testing.assert_allclose(two[1]["stats"]["gate_loads"], one[1]["stats"]["gate_loads"], rtol=0, atol=1e-12)
    assert two[1]["proportions"] == pytest.approx(one[1]["proportions"], abs=1e-9)
    a = load_file(str(tmp_path / "p1" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "p2" / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


# DataFlex's examples/train_full/mixers/dynamic_moe_mixer.yaml, key for key.
DATAFLEX_YAML = """\
model_name_or_path: /path/to/LLaMA-MoE-v1-3_5B-2_8
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json
flash_attn: fa2
dataset: code,math,sharegpt,orca
template: llama2
cutoff_len: 2048
overwrite_cache: true
preprocessing_num_workers: 128
dataloader_num_workers: 0
mixer_eval_dataset: code_eval,math_eval,sharegpt_eval,orca_eval
output_dir: ../dataflex_saves/LLaMA-MoE-v1-3_5B-2_8/dynamic_moe_sft_mixer
logging_steps: 10
save_steps: 1000
plot_loss: true
overwrite_output_dir: true
per_device_train_batch_size: 8
gradient_accumulation_steps: 2
learning_rate: 2.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.03
bf16: true
train_type: dynamic_mix
components_cfg_file: src/dataflex/configs/components.yaml
component_name: dynamic_moe
mixture_sample_rule: mixture
static_mix: false
warmup_step: 60
update_step: 100
update_times: -1
train_step: 2000
max_steps: 2000
freeze_gate: true
"""
# Its components.yaml entry, unchanged.
DATAFLEX_COMPONENTS = """\
mixers:
  dynamic_moe:
    name: dynamic_moe
    params:
      eta: 10.0
      c: 0.05
      collect_steps: 5
      eval_samples: 1000
      eval_batch_size: 32
"""


def test_dataflex_dynamic_moe_yaml_runs_with_the_model_and_data_swapped(
    moe_dir, demo_dir, kedro_project, tmp_path, monkeypatch
):
    from dataflex.cli import build_train_params, main

    root = tmp_path / "DataFlex"
    (root / "src" / "dataflex" / "configs").mkdir(parents=True)
    (root / "src" / "dataflex" / "configs" / "components.yaml").write_text(DATAFLEX_COMPONENTS)
    (root / "examples" / "deepspeed").mkdir(parents=True)
    (root / "examples" / "deepspeed" / "ds_z3_config.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = yaml.safe_load(DATAFLEX_YAML)
    cfg.update(
        model_name_or_path=str(moe_dir),
        dataset="arith_train,reverse_train,sort_train",
        mixer_eval_dataset=EVAL_SETS,
        dataset_dir=str(demo_dir),
        output_dir=str(tmp_path / "saves"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_step=2,
        update_step=2,
        train_step=4,
        max_steps=4,
        logging_steps=2,
    )
    (root / "examples" / "dynamic_moe_mixer.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(root)
    argv = ["train", "examples/dynamic_moe_mixer.yaml", "--project-dir", str(kedro_project)]
    assert main([*argv, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    summary = json.loads((tmp_path / "saves" / "run_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["component"]["params"]["collect_steps"] == 5
    history = [json.loads(x) for x in (tmp_path / "saves" / "mixture" / "proportions.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2] and np.asarray(history[1]["stats"]["gate_loads"]).shape == (3, 4)
    before = load_file(str(moe_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "saves" / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in _gate(before))  # freeze_gate: true

    # The project's own example validates with the tiny MoE it names built elsewhere.
    example = Path(__file__).resolve().parents[2] / "examples" / "train_full" / "mixers" / "dynamic_moe.yaml"
    params = build_train_params(
        str(example), [f"model_name_or_path={moe_dir}", f"dataset_dir={demo_dir}", f"output_dir={tmp_path / 'ex'}"]
    )
    assert params["dataflex"]["component_name"] == "dynamic_moe" and params["model"]["freeze_gate"] is True
