"""DataFlex drop-in: a checkout laid out like DataFlex's (data/dataset_info.json with hub and preference entries the
runs never name, src/dataflex/configs/components.yaml, examples/*.yaml), one YAML per DataFlex example written here
with every key DataFlex's own examples use, run from the checkout through `dataflex-cli train` with only the model
path, the output dir and step counts set. Each run trains (global_step > 0) and its component received the
components file's values (from run_summary.json's record of its parameters)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import copy_project

# Keys every DataFlex / LLaMA-Factory example YAML carries (values as DataFlex's examples set them).
COMMON = {
    "trust_remote_code": True,
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_target": "all",
    "lora_rank": 16,
    "lora_alpha": 8,
    "template": "llama3",
    "cutoff_len": 4096,
    "overwrite_cache": True,
    "preprocessing_num_workers": 16,
    "dataloader_num_workers": 0,
    "seed": 42,
    "logging_steps": 10,
    "save_steps": 100,
    "plot_loss": True,
    "save_only_model": False,
    "overwrite_output_dir": True,
    "report_to": "none",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1.0e-4,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": True,
    "ddp_timeout": 180000000,
    "components_cfg_file": "src/dataflex/configs/components.yaml",
}
SELECT = {
    "dataset": "alpaca_en_demo",
    "train_type": "dynamic_select",
    "warmup_step": 2,
    "update_step": 2,
    "update_times": 2,
    "eval_dataset": "alpaca_zh_demo",
    "per_device_eval_batch_size": 1,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    "load_best_model_at_end": False,
    "eval_strategy": "steps",
    "eval_steps": 10,
}
WEIGHT = {
    "dataset": "alpaca_en_demo",
    "train_type": "dynamic_weight",
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "warmup_step": 2,
    "train_step": 4,
}
PT = {
    "stage": "pt",
    "dataset": "wiki_demo,c4_demo",
    "template": "qwen",
    "cutoff_len": 2048,
    "train_type": "dynamic_mix",
    "mixture_sample_rule": "mixture",
    "init_mixture_proportions": [0.5, 0.5],
    "eval_dataset": "c4_demo",
    "per_device_train_batch_size": 2,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.05,
}
FULL = {"train_from_scratch": True, "finetuning_type": "full", "deepspeed": "examples/deepspeed/ds_z3_config.json"}

# name -> (YAML keys over COMMON, the component's parameters the run must have received from components.yaml)
EXAMPLES: dict[str, tuple[dict, dict]] = {
    "selectors/random": ({**SELECT, "component_name": "random"}, {"seed": 42, "replacement": False}),
    "selectors/loss": ({**SELECT, "component_name": "loss"}, {"focus": "medium"}),
    "selectors/delta_loss": ({**SELECT, "component_name": "delta_loss"}, {"window_size": 0.2}),
    "selectors/less": ({**SELECT, "component_name": "less"}, {"gradient_type": "adam", "proj_dim": 64, "seed": 123}),
    "selectors/custom": ({**SELECT, "component_name": "custom"}, {}),
    # indices_path / probs_path: files `dataflex-cli offline-select` wrote (DataFlex's offline tools)
    "selectors/near": (
        {**SELECT, "component_name": "near"},
        {"indices_path": "./src/dataflex/offline_selector/top_indices.npy"},
    ),
    "selectors/tsds": (
        {**SELECT, "component_name": "tsds"},
        {"probs_path": "./src/dataflex/offline_selector/tsds_probs.npy"},
    ),
    "selectors/cluster_less": (
        {**SELECT, "component_name": "cluster_less"},
        {"cluster_size": 8, "samples_per_cluster": 2, "clustering_method": "kmeans"},
    ),
    "selectors/nice": (
        {**SELECT, "component_name": "nice"},
        {"reward_model_backend": "local", "mc_samples": 2, "generation_temperature": 0.7},
    ),
    "weighters/loss": ({**WEIGHT, "component_name": "loss"}, {"strategy": "quadratic", "delta": 0.5, "r": 2.0}),
    "weighters/adapt": (
        {**WEIGHT, "component_name": "adapt", "eval_dataset": "alpaca_en_demo"},  # an eval set that also trains
        {"tau": 0.5, "refresh_interval": 2, "anchor_batch_size": 4},
    ),
    "weighters/custom": ({**WEIGHT, "component_name": "custom"}, {"strategy": "uniform"}),
    "mixers/random": (
        {
            "dataset": "alpaca_en_demo,alpaca_zh_demo",
            "train_type": "dynamic_mix",
            "component_name": "random",
            "warmup_step": 2,
            "update_step": 2,
            "update_times": 2,
            "eval_dataset": "mmlu_eval",
        },
        {"seed": 42},
    ),
    "mixers/odm_dynamic_qwen_pt_full": (
        # update_times: -1 = update every update_step until the epochs end (DataFlex's ODM example)
        {**PT, **FULL, "component_name": "odm", "warmup_step": 2, "update_step": 2, "update_times": -1},
        {"alpha": 0.9, "warmup_steps": 2, "reward_scale": 15.0, "initial_proportions": [0.5, 0.5]},
    ),
    "test/test_mix": (
        {
            "dataset": "alpaca_en_demo,alpaca_zh_demo",
            "train_type": "dynamic_mix",
            "component_name": "random",
            "mixture_sample_rule": "mixture",
            "init_mixture_proportions": [0.7, 0.3],
            "warmup_step": 2,
            "update_step": 2,
            "update_times": 2,
        },
        {"seed": 42},
    ),
    "test/test_static_mix": (
        {
            "dataset": "alpaca_en_demo,alpaca_zh_demo",
            "train_type": "dynamic_mix",
            "static_mix": True,
            "mixture_sample_rule": "mixture",
            "init_mixture_proportions": [0.7, 0.3],
            "train_step": 3,
        },
        None,  # a static mix calls no mixer
    ),
    "test/test_select": (
        {"dataset": "alpaca_en_demo", "train_type": "dynamic_select", "component_name": "delta_loss"}
        | {"warmup_step": 2, "update_step": 2, "update_times": 2},
        {"window_size": 0.2},
    ),
    "test/test_weight": (
        {"dataset": "alpaca_en_demo", "train_type": "dynamic_weight", "component_name": "custom"}
        | {"warmup_step": 1, "train_step": 3},
        {"strategy": "uniform"},
    ),
}


def _components_yaml(reference: str, model: str) -> str:
    """A components file in DataFlex's layout, with DataFlex's parameter names (values chosen for a tiny run)."""
    return f"""\
selectors:
  less:
    name: less
    params: {{cache_dir: ../dataflex_saves/less_output, gradient_type: adam, proj_dim: 64, seed: 123,
              save_interval: 16}}
  loss:
    name: loss
    params: {{cache_dir: ../dataflex_saves/loss_output, focus: "medium"}}
  delta_loss:
    name: delta_loss
    params: {{cache_dir: ../dataflex_saves/delta_loss_output, window_size: 0.2}}
  random:
    name: random
    params: {{cache_dir: ../dataflex_saves/random_output, seed: 42, replacement: false}}
  custom:
    name: custom
    params: {{cache_dir: ../dataflex_saves/custom_output}}
  near:
    name: near
    params: {{indices_path: ./src/dataflex/offline_selector/top_indices.npy, cache_dir: ../dataflex_saves/near_output}}
  tsds:
    name: tsds
    params: {{probs_path: ./src/dataflex/offline_selector/tsds_probs.npy, cache_dir: ../dataflex_saves/tsds_output}}
  cluster_less:
    name: cluster_less
    params: {{cache_dir: ../dataflex_saves/cluster_less_output, gradient_type: adam, proj_dim: 64, seed: 42,
              save_interval: 16, cluster_size: 8, samples_per_cluster: 2, clustering_batch_size: 8,
              clustering_max_iter: 10, clustering_method: kmeans, representative_strategy: random,
              embedding_model_name_or_path: null, embedding_model_dtype: auto, embedding_layer: -1}}
  nice:
    name: nice
    params: {{cache_dir: ../dataflex_saves/nice_output, gradient_type: adam, proj_dim: 64, seed: 123,
              save_interval: 16, reward_model_backend: local, reward_model_path: {model},
              policy_model_path: {model}, mc_samples: 2, max_new_tokens: 8, generation_temperature: 0.7,
              max_prompt_length: 64}}
mixers:
  random:
    name: random
    params: {{seed: 42}}
  doremi:
    name: doremi
    params: {{reference_model_path: {reference}, reweight_eta: 0.1, reweight_eps: 0.01}}
  static:
    name: static
    params: {{proportions: [0.5, 0.5]}}
  odm:
    name: odm
    params: {{alpha: 0.9, warmup_steps: 2, reward_scale: 15.0, min_exploration_rate: 0.03,
              initial_proportions: [0.5, 0.5]}}
weighters:
  loss:
    name: loss
    params: {{strategy: quadratic, delta: 0.5, r: 2.0}}
  adapt:
    name: adapt
    params: {{tau: 0.5, refresh_interval: 2, anchor_batch_size: 4, clip: null}}
  custom:
    name: custom
    params: {{strategy: uniform}}
"""


def _rows(path: Path, n: int) -> list[dict]:
    return json.loads(path.read_text())[:n]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, project_root, demo_dir, tiny_model_dir):
    """A DataFlex-like checkout: its data folder (local demo sets in DataFlex's names, plus hub, preference and
    ranking entries no run names), its components file and its deepspeed folder."""
    base = tmp_path_factory.mktemp("dataflex")
    project = copy_project(project_root, base)
    from dataflex.cli import main

    root = base / "DataFlex"  # outputs go to ../dataflex_saves, as in DataFlex's examples
    data = root / "data"
    data.mkdir(parents=True)
    (data / "alpaca_en_demo.json").write_text(json.dumps(_rows(demo_dir / "arith_train.json", 32)))
    (data / "alpaca_zh_demo.json").write_text(json.dumps(_rows(demo_dir / "reverse_train.json", 32)))
    (data / "mmlu_eval.json").write_text(json.dumps(_rows(demo_dir / "arith_dev.json", 8)))
    for name, source in (("wiki_demo", "text_stories_train.jsonl"), ("c4_demo", "text_numbers_train.jsonl")):
        lines = (demo_dir / source).read_text().splitlines()[:24]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    text_column = json.loads((demo_dir / "text_stories_train.jsonl").read_text().splitlines()[0])
    column = next(iter(text_column))
    info = {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},
        "mmlu_eval": {"file_name": "mmlu_eval.json"},
        "wiki_demo": {"file_name": "wiki_demo.jsonl", "columns": {"prompt": column}},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": column}},
        # entries no run here names: hub sets (no network in tests) and preference data
        "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en"},
        "glaive_toolcall_en": {"hf_hub_url": "llamafactory/glaive_toolcall_en", "formatting": "sharegpt"},
        "belle_multiturn": {"script_url": "belle_multiturn", "formatting": "sharegpt"},
        "dpo_en_demo": {
            "file_name": "dpo_en_demo.json",
            "ranking": True,
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        },
        "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
    }
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    configs = root / "src" / "dataflex" / "configs"
    configs.mkdir(parents=True)
    (configs / "components.yaml").write_text(
        _components_yaml("../dataflex_saves/doremi_step1/model", str(tiny_model_dir))
    )
    offline = root / "src" / "dataflex" / "offline_selector"
    for method in ("near", "tsds"):  # DataFlex's offline tools' files, for indices_path / probs_path
        argv = ["offline-select", method, "--candidates", str(data / "alpaca_en_demo.json"), "--queries"]
        argv += [str(data / "alpaca_zh_demo.json"), "--output", str(offline), "--tokenizer", str(tiny_model_dir)]
        assert main([*argv, "--template", "llama3", "--cutoff-len", "4096"]) == 0
    (root / "examples" / "deepspeed").mkdir(parents=True)
    (root / "examples" / "deepspeed" / "ds_z3_config.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return {"root": root, "project": project}


def _train(checkout, tiny_model_dir, name: str, keys: dict, *extra: str) -> dict:
    """Write examples/<name>.yaml (DataFlex's keys), run it from the checkout, return its run summary."""
    from dataflex.cli import main

    root = checkout["root"]
    path = root / "examples" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = f"../dataflex_saves/{name.replace('/', '_')}"
    cfg = {**COMMON, **keys, "model_name_or_path": str(tiny_model_dir), "output_dir": out}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = ["train", f"examples/{name}.yaml", *extra, "--project-dir", str(checkout["project"])]
    rc = main([*argv, "--mlflow-uri", f"sqlite:///{root / 'mlflow.db'}"])
    while mlflow.active_run():
        mlflow.end_run()
    assert rc == 0, name
    return json.loads((root / out / "run_summary.json").resolve().read_text())


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_a_dataflex_example_runs_unchanged(checkout, tiny_model_dir, monkeypatch, name):
    monkeypatch.chdir(checkout["root"])
    keys, expected = EXAMPLES[name]
    summary = _train(checkout, tiny_model_dir, name, keys)
    assert summary["global_step"] > 0
    if expected is None:
        assert summary["component"] is None
        return
    received = summary["component"]["params"]
    assert {k: received[k] for k in expected} == expected, received


def test_dataflex_doremi_three_steps_from_scratch(checkout, tiny_model_dir, monkeypatch):
    """DoReMi as DataFlex's examples run it: step 1 a static mix from scratch (the reference), step 2 the doremi
    mixer against it (reference_model_path from the components file), step 3 a static mix at step 2's weights."""
    monkeypatch.chdir(checkout["root"])
    common = {**PT, **FULL, "warmup_step": 2, "update_step": 2, "update_times": 2}
    step1 = _train(checkout, tiny_model_dir, "doremi_step1", {**common, "component_name": "static", "static_mix": True})
    assert step1["global_step"] > 0
    step2 = _train(checkout, tiny_model_dir, "doremi_step2", {**common, "component_name": "doremi"})
    assert step2["global_step"] > 0
    assert step2["component"]["params"]["reweight_eta"] == 0.1 and step2["component"]["params"]["reweight_eps"] == 0.01
    result = json.loads((checkout["root"] / "../dataflex_saves/doremi_step2/train_result.json").resolve().read_text())
    weights = result["mixture_history"][-1]["proportions"]
    assert len(weights) == 2 and abs(sum(weights) - 1) < 1e-6
    step3_keys = {**common, "component_name": "static", "static_mix": True, "init_mixture_proportions": weights}
    step3 = _train(checkout, tiny_model_dir, "doremi_step3", step3_keys)
    assert step3["global_step"] > 0


def test_a_dataflex_merge_yaml_exports(checkout, tiny_model_dir, monkeypatch):
    """examples/merge_lora/*.yaml: LLaMA-Factory's export keys, run from the checkout."""
    from dataflex.cli import main

    monkeypatch.chdir(checkout["root"])
    adapter = checkout["root"] / "../dataflex_saves/weighters_loss/adapter"
    if not adapter.resolve().is_dir():
        _train(checkout, tiny_model_dir, "weighters/loss", EXAMPLES["weighters/loss"][0])
    merge = {
        "model_name_or_path": str(tiny_model_dir),
        "adapter_name_or_path": "../dataflex_saves/weighters_loss/adapter",
        "template": "llama3",
        "trust_remote_code": True,
        "export_dir": "../dataflex_saves/merged",
        "export_size": 5,
        "export_device": "cpu",
        "export_legacy_format": False,
    }
    path = checkout["root"] / "examples" / "merge_lora" / "llama3_lora_sft.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merge))
    assert main(["export", "examples/merge_lora/llama3_lora_sft.yaml"]) == 0
    assert (checkout["root"] / "../dataflex_saves/merged/config.json").resolve().is_file()


def test_dataflex_doremi_steps_with_a_zero3_json_on_two_processes(checkout, tiny_model_dir, monkeypatch):
    """DataFlex's full-parameter DoReMi YAMLs name `deepspeed: examples/deepspeed/ds_z3_config.json`: on 2 CPU
    processes it is mapped onto FSDP2 full_shard (sharded TrainState) and the steps run."""
    monkeypatch.chdir(checkout["root"])
    common = {**PT, **FULL, "warmup_step": 2, "update_step": 2, "update_times": 1, "num_processes": 2}
    step1 = _train(checkout, tiny_model_dir, "ds_step1", {**common, "component_name": "static", "static_mix": True})
    assert step1["global_step"] > 0
    manifest = checkout["root"] / "../dataflex_saves/ds_step1/checkpoints"
    assert not manifest.resolve().exists() or all(
        json.loads((c / "manifest.json").read_text()).get("sharded_processes") == 2
        for c in manifest.resolve().iterdir()
        if c.name.startswith("checkpoint-")
    )
    assert (checkout["root"] / "../dataflex_saves/ds_step1/model/model.safetensors").resolve().is_file()
