"""End to end: `kedro run` on the demo and `dataflex-cli train` on a static YAML, each in a temporary project copy
with a temporary MLflow database. They train. (Pipeline shapes are in tests/pipelines/test_pipeline_shapes.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml


def _end_runs() -> None:
    while mlflow.active_run():
        mlflow.end_run()


def _run_kedro(project: Path, runtime_params: dict, pipeline: str | None = None) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    try:
        with KedroSession.create(project_path=project, runtime_params=runtime_params) as session:
            session.run(pipeline_names=[pipeline] if pipeline else None)
    finally:
        _end_runs()


def _mlflow_run(db: Path, run_id: str):
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return client, client.get_run(run_id)


def test_kedro_run_demo_end_to_end(kedro_project, project_root, tmp_path, monkeypatch):
    """`kedro run` with no pipeline: builds the demo corpus and a tiny model in the project, processes, trains,
    evaluates, reports, and logs everything to one MLflow run."""
    project = kedro_project
    monkeypatch.chdir(project)
    db = project / "mlflow.db"
    params = {
        "mlflow_uri": f"sqlite:///{db}",
        "demo": {"model_size": "test", "pretrain_steps": 10},
        "train": {"max_steps": 12, "logging_steps": 4, "per_device_train_batch_size": 8, "progress_bar": False},
        "eval": {"max_generate_samples": 4, "max_new_tokens": 6},
    }
    _run_kedro(project, params)

    out = project / "data" / "06_models" / "static"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["train_type"] == "static" and summary["global_step"] == 12
    assert summary["train_samples_seen"] == 12 * 8
    assert set(summary["eval"]) == {f"{d}_test" for d in ("arith", "reverse", "sort", "wordcount", "facts", "format")}
    for metrics in summary["eval"].values():
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert (project / "data" / "08_reporting" / "loss_curve.png").stat().st_size > 1000
    assert "| arith_test |" in (project / "data" / "08_reporting" / "metrics_table.md").read_text()

    # The adapter is standard peft and reloads onto the demo base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(project / "data" / "01_raw" / "tiny_llama")
    PeftModel.from_pretrained(base, out / "adapter")

    client, run = _mlflow_run(db, summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.lora_rank"] == "8"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
    assert "eval/arith_test/loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "run_summary.json", "metrics_table.md"} <= artifacts

    # Processed data is reused when inputs are unchanged: the cache holds one entry per dataset build.
    cache = project / "data" / "02_intermediate" / "cache"
    before = sorted(p.name for p in cache.iterdir())
    _run_kedro(project, params, pipeline="data_processing")
    assert sorted(p.name for p in cache.iterdir()) == before


def test_cli_train_static_yaml(kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch, capsys):
    from dataflex.cli import main

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "lora_alpha": 8,
        "dataset": "arith_train,reverse_train",
        "eval_dataset": "arith_test",
        "dataset_dir": str(demo_dir),
        "template": "default",
        "cutoff_len": 64,
        "output_dir": "saves/static",
        "logging_steps": 2,
        "save_steps": 3,
        "plot_loss": True,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "ddp_timeout": 180000000,
        "report_to": "none",
        "train_type": "static",
        "max_new_tokens": 4,
    }
    (tmp_path / "static.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"

    def train(*overrides: str) -> int:
        argv = ["train", "static.yaml", "learning_rate=5e-4", "max_steps=6", *overrides]
        rc = main([*argv, "--project-dir", str(project), "--mlflow-uri", f"sqlite:///{db}"])
        _end_runs()
        return rc

    assert train() == 0
    out = tmp_path / "saves" / "static"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["train_type"] == "static"
    assert summary["train_samples_seen"] == 6 * 4 * 2
    assert set(summary["eval"]["arith_test"]) == {"loss", "perplexity", "accuracy"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    _, run = _mlflow_run(db, summary["mlflow_run_id"])
    assert float(run.data.params["train.learning_rate"]) == 5e-4

    # Resume from the finished run's checkpoint-3 reproduces the same adapter (same YAML + resume key).
    capsys.readouterr()
    assert train("output_dir=saves/resumed", "resume_from_checkpoint=saves/static/checkpoints/checkpoint-3") == 0
    log = "".join(capsys.readouterr())
    assert "resumed from" in log and "at step 3" in log  # dataflex's own log lines reach dataflex-cli's output
    from safetensors.torch import load_file

    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "saves" / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)

    # A killed save left a temp dir in the finished run: resuming that run removes it (it is never read).
    stale = out / "checkpoints" / ".checkpoint-9.k1ll.tmp"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"half-written")
    assert train("resume_from_checkpoint=latest") == 0
    assert not stale.exists() and json.loads((out / "run_summary.json").read_text())["global_step"] == 6

    # The same resume on 2 accelerate workers (4 x 1 x 2 processes: the same global batch): the same adapter,
    # and the workers' metrics reach the orchestrator's MLflow run.
    two = [
        "output_dir=saves/two",
        "num_processes=2",
        "gradient_accumulation_steps=1",
        ckpt3 := ("resume_from_checkpoint=saves/static/checkpoints/checkpoint-3"),
    ]
    assert train(*two) == 0
    c = load_file(str(tmp_path / "saves" / "two" / "adapter" / "adapter_model.safetensors"))
    assert all((a[k] - c[k]).abs().max() <= 1e-6 for k in a)
    summary2 = json.loads((tmp_path / "saves" / "two" / "run_summary.json").read_text())
    client, _ = _mlflow_run(db, summary2["mlflow_run_id"])
    assert [m.step for m in client.get_metric_history(summary2["mlflow_run_id"], "train/loss")] == [4, 6]
    assert train("output_dir=saves/nope", "num_processes=2", "accelerate_config=nope.yaml", ckpt3) == 2
    assert "accelerate_config file" in capsys.readouterr().err.strip().splitlines()[-1]

    # A checkpoint from another model is refused before training.
    ckpt = "resume_from_checkpoint=saves/static/checkpoints/checkpoint-3"
    assert train("lora_rank=2", "output_dir=saves/other", ckpt) == 2
    assert "from another model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "saves" / "other" / "adapter").exists()

    # Every sample fully masked (the prompt fills cutoff_len): one line, before training, nothing written.
    assert train("cutoff_len=1", "output_dir=saves/masked") == 2
    assert "fully masked" in capsys.readouterr().err.strip().splitlines()[-1]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "attributes.status = 'FAILED'")  # a refusal leaves no failed run
    assert not (tmp_path / "saves" / "masked").exists()

    # export merges the adapter into its base (llamafactory-cli export).
    assert main(["export", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # ... and from LLaMA-Factory's merge YAML, its keys unchanged (relative paths against the working dir)
    merge_yaml = tmp_path / "merge.yaml"
    merge_yaml.write_text(
        f"model_name_or_path: {tiny_model_dir}\nadapter_name_or_path: {out / 'adapter'}\ntemplate: llama3\n"
        "trust_remote_code: true\nexport_dir: merged_lf\nexport_size: 5\nexport_device: cpu\n"
        "export_legacy_format: false\n"
    )
    assert main(["export", str(merge_yaml)]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_lf")
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), again.state_dict().values()))
    merge_yaml.write_text(merge_yaml.read_text().replace("export_legacy_format: false", "export_legacy_format: true"))
    assert main(["export", str(merge_yaml)]) == 2
    assert "safetensors only" in capsys.readouterr().err


def test_kedro_run_bad_params_is_one_line(kedro_project, project_root, tmp_path, monkeypatch):
    project = kedro_project
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exc:
        _run_kedro(project, {"mlflow_uri": f"sqlite:///{project / 'm.db'}", "train": {"learning_rate": -1}})
    assert exc.value.code == "error: train.learning_rate must be > 0, got -1"


def test_cli_dynamic_weight_with_components_file(
    kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch, capsys
):
    """train_type: dynamic_weight through dataflex-cli with a DataFlex components YAML; weight stats reach MLflow."""
    from dataflex.cli import main

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    (tmp_path / "components.yaml").write_text(
        "weighters:\n  loss:\n    name: loss\n    params:\n      strategy: linupper\n      delta: 1.0\n"
        "  bad:\n    name: loss\n    params:\n      strategy: hardest\n"
    )
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset": "arith_train,reverse_train",
        "eval_dataset": "arith_dev",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 64,
        "output_dir": "saves/weight",
        "logging_steps": 2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1.0e-3,
        "train_type": "dynamic_weight",
        "component_name": "loss",
        "components_cfg_file": "components.yaml",
        "warmup_step": 2,
        "train_step": 6,
    }
    (tmp_path / "weight.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"
    argv = ["--project-dir", str(project), "--mlflow-uri", f"sqlite:///{db}"]
    rc = main(["train", "weight.yaml", *argv])
    _end_runs()
    assert rc == 0
    summary = json.loads((tmp_path / "saves" / "weight" / "run_summary.json").read_text())
    assert summary["train_type"] == "dynamic_weight" and summary["component_name"] == "loss"
    assert summary["global_step"] == 6
    assert summary["component"] == {
        "kind": "weighter",
        "key": "loss",
        "name": "loss",
        "params": {"strategy": "linupper", "delta": 1.0, "r": 1.0},  # the file's values over the defaults
    }
    result = json.loads((tmp_path / "saves" / "weight" / "train_result.json").read_text())
    weighted_logs = [h for h in result["log_history"] if "weights/max" in h]
    assert [h["step"] for h in weighted_logs] == [4, 6]  # weighting starts after warmup_step=2
    assert weighted_logs[0]["weights/max"] > 1.0 > weighted_logs[0]["weights/min"]
    assert (project / "data" / "08_reporting" / "weights.png").stat().st_size > 1000
    client, run = _mlflow_run(db, summary["mlflow_run_id"])
    assert len(client.get_metric_history(run.info.run_id, "train/weights/entropy")) == 2
    assert "weights.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.params["component.strategy"] == "linupper" and run.data.params["component.delta"] == "1.0"

    # A bad strategy is refused before training, in one line.
    rc = main(["train", "weight.yaml", "component_name=bad", "output_dir=saves/bad", *argv])
    _end_runs()
    assert rc == 2
    assert "unknown strategy 'hardest'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "saves" / "bad" / "adapter").exists()


SEED_RANDOM_MIXER = """
from dataflex.core.registry import register_mixer
from dataflex.utils.logging import logger
from dataflex.train.mixer.base_mixer import Mixer

import numpy as np

@register_mixer("user_random")
class RandomMixer(Mixer):
    def __init__(self, mixture_manager, seed):
        super().__init__(mixture_manager)
        self.seed = seed

    def mix(self, model, step_id: int, **kwargs) -> np.ndarray:
        k = len(self.mixture_manager.names)
        np.random.seed(self.seed)
        raw = np.random.random(k)
        probs = raw / raw.sum()
        logger.info(f"[RandomMixer] Step {step_id} Generated proportions: {probs}")

        return probs
"""


def test_cli_dynamic_mix_with_the_seed_mixer(
    kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch, capsys
):
    """The seed page's mixer, in a user module, drives an unrolled dynamic_mix run on the pt text domains."""
    from dataflex.cli import main

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_mixers.py").write_text(SEED_RANDOM_MIXER)
    (tmp_path / "components.yaml").write_text(
        "mixers:\n  user_random:\n    name: user_random\n    params:\n      seed: 42\n"
    )
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "stage": "pt",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 32,
        "dataset": "text_stories_train,text_numbers_train,text_noisy_train",
        "eval_dataset": "text_noisy_test",
        "output_dir": "saves/mix",
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "learning_rate": 1.0e-3,
        "train_type": "dynamic_mix",
        "component_name": "user_random",
        "components_cfg_file": "components.yaml",
        "user_modules": ["my_mixers.py"],
        "mixture_sample_rule": "mixture",
        "init_mixture_proportions": [0.6, 0.2, 0.2],
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
    }
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"
    argv = ["--project-dir", str(project), "--mlflow-uri", f"sqlite:///{db}"]
    assert main(["train", "mix.yaml", *argv]) == 0
    _end_runs()
    out = tmp_path / "saves" / "mix"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["train_type"] == "dynamic_mix" and summary["global_step"] == 6
    lines = [json.loads(x) for x in (out / "mixture" / "proportions.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4]
    raw = np.random.RandomState(42).random_sample(3)
    assert lines[1]["proportions"] == pytest.approx((raw / raw.sum()).tolist())
    assert lines[1]["proportions"] == lines[2]["proportions"]  # the seed's mixer re-seeds: the same vector each call
    for k in range(3):
        state = json.loads((out / "rounds" / f"round_{k}" / "state.json").read_text())  # the catalog's TrainState
        assert state["checkpoint"] == str(out / "rounds" / f"round_{k}" / "checkpoint")
        assert (out / "rounds" / f"round_{k}" / "checkpoint" / "manifest.json").is_file()
    assert (project / "data" / "08_reporting" / "mixture_proportions.png").stat().st_size > 1000
    client, run = _mlflow_run(db, summary["mlflow_run_id"])
    assert len(client.get_metric_history(run.info.run_id, "mixture/text_noisy_train")) == 3

    # A fixed sampling rule with a dynamic mixer, and one domain only, are config errors.
    assert main(["train", "mix.yaml", "mixture_sample_rule=uniform", *argv]) == 2
    assert "fixes the proportions" in capsys.readouterr().err
    assert main(["train", "mix.yaml", "init_mixture_proportions=[1.0, 0.0]", *argv]) == 2
    assert "init_mixture_proportions has 2 value" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["train", "mix.yaml", "dataset=text_stories_train", "init_mixture_proportions=null", *argv]) == 2
    assert "at least two domains" in capsys.readouterr().err


def test_cli_doremi_pipeline_and_odm(kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch):
    """The three DoReMi steps chained by one command, the learned weights reaching step 3; and an ODM run."""
    from dataflex.cli import main

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "stage": "pt",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 32,
        "dataset": "text_stories_train,text_numbers_train,text_noisy_train",
        "eval_dataset": "text_noisy_test",
        "output_dir": "saves/doremi",
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "learning_rate": 1.0e-3,
        "train_type": "dynamic_mix",
        "static_mix": True,
        "train_step": 4,
    }
    (tmp_path / "doremi.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"
    argv = ["--project-dir", str(project), "--mlflow-uri", f"sqlite:///{db}"]
    assert main(["train", "doremi.yaml", "--pipeline", "doremi", *argv]) == 0
    _end_runs()
    out = tmp_path / "saves" / "doremi"
    weights = json.loads((out / "mixture" / "doremi_weights.json").read_text())
    assert weights["updates"] == 4 and sum(weights["average_weights"]) == pytest.approx(1.0)
    final = [json.loads(x) for x in (out / "mixture" / "proportions.jsonl").read_text().splitlines()]
    assert final[0]["proportions"] == pytest.approx(weights["average_weights"])  # step 3 trains on them
    assert (out / "reference" / "adapter").is_dir() and (out / "adapter").is_dir()
    assert json.loads((out / "run_summary.json").read_text())["global_step"] == 4
    assert (project / "data" / "08_reporting" / "doremi_weights.png").stat().st_size > 1000

    odm = {
        **cfg,
        "output_dir": "saves/odm",
        "static_mix": False,
        "component_name": "odm",
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
        "train_step": 0,
    }
    (tmp_path / "odm.yaml").write_text(yaml.safe_dump(odm))
    components = {"mixers": {"odm": {"name": "odm", "params": {"warmup_steps": 1, "min_exploration_rate": 0.0}}}}
    (tmp_path / "odm_components.yaml").write_text(yaml.safe_dump(components))
    assert main(["train", "odm.yaml", "components_cfg_file=odm_components.yaml", *argv]) == 0
    _end_runs()
    jsonl = tmp_path / "saves" / "odm" / "mixture" / "proportions.jsonl"
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4] and "rewards" in lines[1]["stats"]


def test_cli_less_pipeline_selects_the_target_domain_and_reuses_the_datastore(
    kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch, capsys
):
    """LESS end to end through a flat YAML: warm-up -> datastore -> target features -> select -> final training.
    The selection comes from the target's domain, its model beats a random selection of the same size on the
    target, and a second run with another target reuses the warm-up and the pool's datastore."""
    from dataflex.cli import main
    from dataflex.config import RunConfig
    from dataflex.evaluation import evaluate_sets
    from dataflex.pipelines.data_processing.nodes import process_data
    from dataflex.train.modes.less import warmup_subset
    from dataflex.train.run import build_model, train

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    domains = ["arith", "reverse", "sort", "wordcount", "facts", "format"]
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(demo_dir),
        "cutoff_len": 64,
        "dataset": ",".join(f"{d}_train" for d in domains),
        "eval_dataset": "arith_test",
        "output_dir": "saves/less",
        "per_device_train_batch_size": 4,
        "logging_steps": 3,
        "learning_rate": 2.0e-3,
        "lora_rank": 4,
        "lora_alpha": 8,
        "max_new_tokens": 4,
        "less_targets": ["arith_dev"],
        "less_proj_dim": 1024,
        "less_shard_size": 100,
        "less_datastore_dir": "store",
        "less_warmup_dir": "warmup",
    }
    (tmp_path / "less.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"
    argv = ["--project-dir", str(project), "--mlflow-uri", f"sqlite:///{db}", "--pipeline", "less"]
    assert main(["train", "less.yaml", *argv]) == 0
    _end_runs()

    sel = json.loads((tmp_path / "saves" / "less" / "less" / "selections" / "arith_dev.json").read_text())
    pool_size = 6 * 40
    assert len(sel["indices"]) == int(0.05 * pool_size) == 12
    assert sel["scores"] == sorted(sel["scores"], reverse=True)
    assert sel["domain_counts"]["arith_train"] >= 0.8 * 12, sel["domain_counts"]
    # The selected rows are written back verbatim in their raw format.
    raw = json.loads((demo_dir / "arith_train.json").read_text())
    lines = [
        json.loads(x)
        for x in (tmp_path / "saves" / "less" / "less" / "selected" / "arith_dev.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 12 and sum(row in raw for row in lines) == sel["domain_counts"]["arith_train"]
    table = (tmp_path / "saves" / "less" / "less" / "scores.csv").read_text().splitlines()
    assert table[0] == "sample_id,domain,source_row,arith_dev" and len(table) == 1 + pool_size
    summary = json.loads((tmp_path / "saves" / "less" / "run_summary.json").read_text())
    assert summary["train_type"] == "less" and summary["global_step"] == 4 * 3  # 12 samples, batch 4, 4 epochs
    for plot in ("less_selected_domains.png", "less_scores.png"):
        assert (project / "data" / "08_reporting" / plot).stat().st_size > 1000
    client, run = _mlflow_run(db, summary["mlflow_run_id"])
    assert run.data.metrics["less/warmup_cache_hit"] == 0.0
    assert "selection.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # A random 5% of the same size, trained the same way, is worse on the target task.
    from dataflex.models import load_tokenizer

    data = {
        "dataset": cfg["dataset"],
        "eval_dataset": "arith_test",
        "dataset_dir": str(demo_dir),
        "template": "default",
        "cutoff_len": 64,
        "stage": "sft",
        "train_on_prompt": False,
        "max_samples": None,
        "val_size": 0.0,
        "packing": False,
        "cache_dir": str(tmp_path / "cache"),
    }
    pool, evals = process_data({"model_name_or_path": str(tiny_model_dir)}, {"data": data, "train": {"seed": 42}})
    model = {
        "model_name_or_path": str(tiny_model_dir),
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "dtype": "fp32",
    }
    train_args = {
        "output_dir": str(tmp_path / "saves" / "random"),
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-3,
        "num_train_epochs": 4.0,
        "logging_steps": 3,
        "progress_bar": False,
    }
    random_subset = pool.select(warmup_subset(len(pool), 0.05, seed=7))
    cfg = RunConfig.from_params({"model": model, "train": train_args})
    result = train(cfg, random_subset)
    tok = load_tokenizer(str(tiny_model_dir))
    random_loss = evaluate_sets(
        build_model(cfg.model, 42, adapter_path=result["adapter_dir"]),
        tok,
        evals,
        batch_size=16,
        generate=False,
        max_new_tokens=4,
        max_generate_samples=0,
        stage="sft",
    )["arith_test"]["loss"]
    assert summary["eval"]["arith_test"]["loss"] < random_loss

    # Two other targets at once, one with two subtasks: the warm-up and the pool's datastore are reused; only the
    # targets' new samples get features (arith_dev's rows are copied from the first run's target store).
    capsys.readouterr()
    assert (
        main(["train", "less.yaml", "less_targets=reverse_dev,arith_dev+sort_dev", "output_dir=saves/less2", *argv])
        == 0
    )
    _end_runs()
    log = "".join(capsys.readouterr())
    assert "LESS warm-up: cache hit" in log and "gradient datastore pool@epoch-1: hit" in log  # shown in the log
    summary2 = json.loads((tmp_path / "saves" / "less2" / "run_summary.json").read_text())
    _, run2 = _mlflow_run(db, summary2["mlflow_run_id"])
    m = run2.data.metrics
    assert m["less/warmup_cache_hit"] == 1.0
    assert all(m[f"less/ckpt_{k}/datastore_cache_hit"] == 1.0 for k in range(4))
    assert m["less/ckpt_0/datastore_computed_samples"] == 0
    assert m["less/ckpt_0/target/reverse_dev_cache_hit"] == 0.0
    assert m["less/ckpt_0/target/arith_dev_sort_dev_computed_samples"] == 8  # sort_dev only
    sel2 = json.loads((tmp_path / "saves" / "less2" / "less" / "selections" / "reverse_dev.json").read_text())
    assert sel2["domain_counts"]["reverse_train"] >= 0.8 * 12, sel2["domain_counts"]
    both = json.loads((tmp_path / "saves" / "less2" / "less" / "selections" / "arith_dev+sort_dev.json").read_text())[
        "domain_counts"
    ]
    assert both["arith_train"] + both["sort_train"] >= 0.8 * 12, both
    final = json.loads((tmp_path / "saves" / "less2" / "train_result.json").read_text())
    assert 12 <= final["selected_samples"] <= 24 and final["targets"] == ["reverse_dev", "arith_dev+sort_dev"]

    # The notebook reads the selection and the datastore through the project's catalog and runs as written.
    import subprocess
    import sys

    nb = json.loads((project_root / "notebooks" / "less_datastore.ipynb").read_text())
    code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    env = {**os.environ, "MPLBACKEND": "Agg", "KEDRO_DISABLE_TELEMETRY": "true"}
    env["DATAFLEX_OUTPUT_DIR"] = str(tmp_path / "saves" / "less2")  # the run to inspect
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "most influential:" in done.stdout and "[reverse_train]" in done.stdout


def test_less_bad_config_is_one_line(
    kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch, capsys
):
    from dataflex.cli import main

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(demo_dir),
        "dataset": "arith_train",
        "output_dir": "saves/bad",
        "less_targets": ["arith_dev"],
    }
    (tmp_path / "less.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--project-dir", str(project), "--pipeline", "less"]
    for override, message in [
        ("less_targets=no_such_dev", "no_such_dev"),
        ("less_percentage=1.5", "less.percentage must be in (0, 1], got 1.5"),
        ("less_aggregation=median", "less.aggregation 'median' is not valid; use one of max, mean"),
        ("less_projector=fjlt", "less.projector 'fjlt' is not valid"),
        ("less_warmup_epochs=0", "less.warmup_epochs must be a positive integer, got 0"),
    ]:
        assert main(["train", "less.yaml", override, *argv]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "saves" / "bad").exists()

    # The one-shot pipeline's flat keys are checked the same way, before any work.
    argv = ["--project-dir", str(project), "--pipeline", "static_select"]
    for override, message in [
        ("static_select_selector=nearest", "unknown selector 'nearest'"),
        ("static_select_percentage=2", "static_select.percentage must be in (0, 1], got 2"),
        ("static_select_final_epochs=0", "static_select.final_epochs must be a positive integer, got 0"),
        ("static_select_targets=no_such_dev", "no_such_dev"),
    ]:
        assert main(["train", "less.yaml", "static_select_targets=arith_dev", override, *argv]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "saves" / "bad").exists()


SEED_CUSTOM_SELECTOR = """
from dataflex.core.registry import register_selector
from dataflex.train.selector.base_selector import logger, Selector

@register_selector('user_first')
class FirstSelector(Selector):
    def __init__(self, dataset, accelerator, data_collator, cache_dir):
        super().__init__(dataset, accelerator, data_collator, cache_dir)
        logger.info(f"FirstSelector initialized.")

    def select(self, model, step_id: int, num_samples: int, **kwargs):
        return list(range(num_samples))
"""


def test_cli_dynamic_select_with_the_seed_selector_and_a_user_module(
    kedro_project, demo_dir, tiny_model_dir, project_root, tmp_path, monkeypatch, capsys
):
    """dynamic_select through a flat YAML and the Kedro rounds: the shipped seed `custom` selector, then a selector
    written exactly as the seed page shows in a user module; selections land in OUTPUT_DIR/selections."""
    from dataflex.cli import main

    project = kedro_project
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_selectors.py").write_text(SEED_CUSTOM_SELECTOR)
    cfg = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_dir": str(demo_dir),
        "cutoff_len": 64,
        "dataset": "arith_train,reverse_train,sort_train",
        "eval_dataset": "arith_test",
        "output_dir": "saves/sel",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "logging_steps": 2,
        "learning_rate": 1.0e-3,
        "max_new_tokens": 4,
        "train_type": "dynamic_select",
        "component_name": "custom",
        "warmup_step": 2,
        "update_step": 2,
        "update_times": 2,
    }
    (tmp_path / "sel.yaml").write_text(yaml.safe_dump(cfg))
    db = tmp_path / "mlflow.db"
    argv = ["--project-dir", str(project), "--mlflow-uri", f"sqlite:///{db}"]
    assert main(["train", "sel.yaml", *argv]) == 0
    _end_runs()
    out = tmp_path / "saves" / "sel"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["train_type"] == "dynamic_select" and summary["global_step"] == 6
    for step in (2, 4):
        sel = json.loads((out / "selections" / f"step_{step}.json").read_text())
        assert sel["indices"] == list(range(16)) and sel["domain_counts"]["arith_train"] == 16  # G = 8, u = 2
    assert (project / "data" / "08_reporting" / "selected_domains_per_round.png").stat().st_size > 1000
    _, run = _mlflow_run(db, summary["mlflow_run_id"])
    assert run.data.metrics["select/fraction/arith_train"] == 1.0

    assert (
        main(
            [
                "train",
                "sel.yaml",
                "component_name=user_first",
                "user_modules=my_selectors.py",
                "output_dir=saves/user",
                *argv,
            ]
        )
        == 0
    )
    _end_runs()
    user = json.loads((tmp_path / "saves" / "user" / "selections" / "step_4.json").read_text())
    assert user["selector"] == "user_first"

    # Bad input: one line, before training.
    for override, message in [
        ("warmup_step=0", "warmup_step >= 1"),
        ("update_step=40", "G x update_step = 320"),
        ("component_name=less", None),
    ]:
        args = ["train", "sel.yaml", override, "output_dir=saves/bad", *argv]
        if message is None:  # less with an eval_dataset is fine; without one it is an error
            args.insert(3, "eval_dataset=")
            message = "'less' needs an eval_dataset"
        assert main(args) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "saves" / "bad").exists()
