"""What a newcomer meets first (issue 20): a wrong pipeline or template name is one line with the valid ones, each
pipeline has its own default output folder, outputs get the umask's modes, an exported model's chat template gives
the token ids training gave, every run ends with a summary, MLflow run names say mode / component / targets, and
final_train_loss averages a full logging window. No training here (the untrained tiny model only)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dataflex.core.errors import ConfigError

CONVERSATIONS = [
    [{"role": "user", "content": "Calculate the result.\n45 + 30"}, {"role": "assistant", "content": "75"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Reverse the letters.\nd w m"},
        {"role": "assistant", "content": "m w d"},
        {"role": "user", "content": "Put the numbers in increasing order.\n10 1 27 9"},
        {"role": "assistant", "content": "1 9 10 27"},
    ],
    [
        {"role": "user", "content": "Rewrite the date as day/month/year.\n2003-12-05"},
        {"role": "assistant", "content": "05/12/2003"},
    ],
]


def _ids(value) -> list[int]:
    return list(value["input_ids"] if hasattr(value, "keys") else value)


def _assert_same_ids_as_training(tokenizer, template_name: str) -> None:
    """apply_chat_template gives training's ids, for whole conversations and for generation prompts."""
    from dataflex.data.templates import get_template

    template = get_template(template_name)
    for messages in CONVERSATIONS:
        trained = [i for prompt, response in template.encode_multiturn(tokenizer, messages) for i in prompt + response]
        assert _ids(tokenizer.apply_chat_template(messages, tokenize=True)) == trained, template_name
        prompt = _ids(tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
        assert prompt == template.encode_prompt(tokenizer, messages[:-1]), template_name


# ---------------------------------------------------------------------------------------------- names
def test_an_unknown_pipeline_is_one_line_with_the_registered_ones(capsys):
    from dataflex.hooks import check_pipeline_names, registered_pipelines

    assert {"static", "less", "dynamic_weight", "static_select", "doremi"} <= set(registered_pipelines())
    check_pipeline_names(["less", "static"])  # known names pass
    with pytest.raises(SystemExit) as exc:
        check_pipeline_names(["lesss"])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "unknown pipeline 'lesss' (did you mean less?)" in lines[0]
    assert "registered pipelines: " in lines[0] and "data_processing, doremi, dynamic_mix" in lines[0]


def test_kedro_run_of_an_unknown_pipeline_stops_before_any_work(kedro_project, monkeypatch, capsys):
    """`kedro run --pipelines=nope` (session.run): exit code 2 and the one line, not Kedro's ImportError traceback."""
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    monkeypatch.chdir(kedro_project)
    bootstrap_project(kedro_project)
    try:
        with KedroSession.create(project_path=kedro_project) as session, pytest.raises(SystemExit) as exc:
            session.run(pipeline_names=["nope"])
    finally:
        pipelines.set_requested(None)  # Kedro keeps the failed run's names; later tests read no run's
    assert exc.value.code == 2
    assert "unknown pipeline 'nope'; registered pipelines:" in capsys.readouterr().err
    assert not (kedro_project / "data").exists()


def test_misspelt_names_get_a_did_you_mean():
    from dataflex.config import flat_to_grouped, validate_params

    with pytest.raises(ConfigError, match=r"learning_rte \(did you mean learning_rate\?\)"):
        flat_to_grouped({"learning_rte": 1e-4})
    with pytest.raises(ConfigError, match=r"train.learning_rte \(did you mean train.learning_rate\?\)"):
        validate_params({"train": {"learning_rte": 1e-4}}, check_paths=False)


# ---------------------------------------------------------------------------------------------- output folders
def _params_and_catalog(project_root: Path, pipelines: list[str] | None, runtime: dict | None = None):
    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import pipelines as registry
    from kedro.framework.project import settings

    registry.set_requested(pipelines)
    try:
        loader = OmegaConfigLoader(
            conf_source=str(project_root / "conf"), runtime_params=runtime, **settings.CONFIG_LOADER_ARGS
        )
        return loader["parameters"], loader["catalog"]
    finally:
        registry.set_requested(None)


def test_each_pipeline_has_its_own_default_output_folder(project_root, monkeypatch):
    from kedro.framework.startup import bootstrap_project

    monkeypatch.chdir(project_root)
    bootstrap_project(project_root)
    seen = {}
    for names, expected in [
        (None, "data/06_models/static"),  # bare `kedro run`: the demo
        (["static"], "data/06_models/static"),
        (["less"], "data/06_models/less"),
        (["dynamic_weight"], "data/06_models/dynamic_weight"),
        (["dynamic_select"], "data/06_models/dynamic_select"),
        (["dynamic_mix"], "data/06_models/dynamic_mix"),
        (["doremi"], "data/06_models/doremi"),
        (["static_select"], "data/06_models/static_select"),
        (["evaluation"], "data/06_models/static"),  # reads a run: the demo's unless told otherwise
    ]:
        params, catalog = _params_and_catalog(project_root, names)
        assert params["train"]["output_dir"] == expected, names
        assert catalog["run_summary"]["dataset"]["filepath"] == f"{expected}/run_summary.json"
        assert catalog["train_pool"]["path"] == f"{expected}/data/train_pool"
        seen[tuple(names or ())] = expected
        # A run replaces its output folder whole: the shared warm-up caches must live outside every one of them.
        for group in ("less", "static_select"):
            assert not Path(params[group]["warmup_dir"]).is_relative_to(expected), (group, expected)
    trainers = {v for k, v in seen.items() if k and k[0] not in ("evaluation",)}
    assert len(trainers) == 7  # one folder per training pipeline

    # An explicit train.output_dir still moves every artefact.
    params, catalog = _params_and_catalog(project_root, ["less"], {"train": {"output_dir": "elsewhere/run"}})
    assert params["train"]["output_dir"] == "elsewhere/run"
    assert catalog["less.selection"]["dataset"]["path"] == "elsewhere/run/less"


# ---------------------------------------------------------------------------------------------- file modes
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_modes_and_stay_atomic(umask, tmp_path, monkeypatch, untrained_model_dir):
    import torch
    from safetensors.torch import save_file

    from dataflex.models import load_model, load_tokenizer, merge_and_export, save_trained
    from dataflex.utils import io

    monkeypatch.setattr(io, "_UMASK", umask)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask

    summary = io.atomic_write_json(tmp_path / "run_summary.json", {"global_step": 1})
    assert _mode(summary) == file_mode
    with io.atomic_dir(tmp_path / "checkpoint") as tmp:
        assert _mode(tmp) == 0o700  # mkdtemp's: nobody sees a folder while it is written
        save_file({"w": torch.zeros(2)}, str(tmp / "trainable.safetensors"))  # safetensors writes 0600
        (tmp / "sub").mkdir()
    assert _mode(tmp_path / "checkpoint") == dir_mode
    assert _mode(tmp_path / "checkpoint" / "trainable.safetensors") == file_mode
    assert not list(tmp_path.glob(".*.tmp"))

    model = load_model(str(untrained_model_dir), lora_rank=2, device="cpu", seed=0)
    adapter = save_trained(model, tmp_path / "adapter", tokenizer=load_tokenizer(untrained_model_dir))
    merged = merge_and_export(adapter, tmp_path / "merged")
    for folder in (adapter, merged):
        assert _mode(folder) == dir_mode
        for f in folder.iterdir():
            assert _mode(f) == file_mode, f
    assert (adapter / "adapter_model.safetensors").is_file() and (merged / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- chat template
@pytest.mark.parametrize("template_name", ["default", "llama3", "qwen"])
def test_the_chat_template_gives_the_training_token_ids(template_name, tokenizer):
    from dataflex.models.loader import set_chat_template

    original = tokenizer.chat_template
    try:
        set_chat_template(tokenizer, template_name)
        _assert_same_ids_as_training(tokenizer, template_name)
    finally:
        tokenizer.chat_template = original


def test_an_exported_model_prompts_as_its_run_trained(tmp_path, untrained_model_dir, caplog):
    """The run saves its template's chat template next to the adapter; export carries it (or --template's)."""
    from transformers import AutoTokenizer

    from dataflex.cli import main
    from dataflex.models import load_model, load_tokenizer, merge_and_export, save_trained

    base_tokenizer = load_tokenizer(untrained_model_dir)
    base_template = base_tokenizer.chat_template
    model = load_model(str(untrained_model_dir), lora_rank=2, device="cpu", seed=0)
    adapter = save_trained(model, tmp_path / "adapter", tokenizer=base_tokenizer, template="llama3")
    assert base_tokenizer.chat_template == base_template  # the run's own tokenizer is left as it was

    _assert_same_ids_as_training(AutoTokenizer.from_pretrained(adapter), "llama3")
    merged = merge_and_export(adapter, tmp_path / "merged")
    _assert_same_ids_as_training(AutoTokenizer.from_pretrained(merged), "llama3")

    # --template (or a LLaMA-Factory merge YAML's `template`) chooses another one; a wrong name is one line.
    assert main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "qwen"), "--template", "qwen"]) == 0
    _assert_same_ids_as_training(AutoTokenizer.from_pretrained(tmp_path / "qwen"), "qwen")
    assert main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "x"), "--template", "lama3"]) == 2
    assert not (tmp_path / "x").exists()

    # A template without a chat-template form (`empty`: prompt and response meet without a separator) writes none.
    with caplog.at_level("INFO", logger="dataflex"):
        empty = merge_and_export(adapter, tmp_path / "empty", template="empty")
    assert not AutoTokenizer.from_pretrained(empty).chat_template
    assert "has no chat-template form" in caplog.text


# ---------------------------------------------------------------------------------------------- run end
def test_every_run_ends_with_a_summary(tmp_path, monkeypatch):
    from dataflex.hooks import end_of_run_summary

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "data" / "06_models" / "less"
    (out / "adapter").mkdir(parents=True)
    (tmp_path / "data" / "08_reporting").mkdir()
    summary = {
        "global_step": 12,
        "train_samples_seen": 96,
        "final_train_loss": 1.23456,
        "eval": {"arith_test": {"loss": 0.5, "perplexity": 1.6487, "accuracy": 0.25}, "text_test": {"loss": 2.0}},
        "mlflow_run_id": "abc123",
    }
    (out / "run_summary.json").write_text(json.dumps(summary))
    text = end_of_run_summary("less", {"train": {"output_dir": "data/06_models/less"}})
    assert text.splitlines()[0] == "dataflex: less run finished"
    assert "outputs:  data/06_models/less/ (adapter/, run_summary.json)" in text
    assert "reports:  data/08_reporting/" in text
    assert "global_step=12  train_samples_seen=96  final_train_loss=1.2346" in text
    assert "| arith_test | 0.5000 | 1.65 | 0.250 |" in text and "| text_test | 2.0000 | - | - |" in text
    assert "MLflow:   run abc123 in " in text
    # A summary left by an earlier run is not this run's.
    stale = end_of_run_summary("less", {"train": {"output_dir": "data/06_models/less"}}, started=1e12)
    assert "global_step" not in stale and "outputs:  data/06_models/less/" in stale


def test_mlflow_run_names_say_mode_component_and_targets(monkeypatch):
    from dataflex import hooks

    def name(pipelines: list[str], params: dict) -> str | None:
        monkeypatch.setattr(hooks, "_PARAMS", params)
        monkeypatch.setattr(hooks, "requested_pipelines", lambda: pipelines)
        return hooks.mlflow_run_name()

    base = {"dataflex": {"component_name": "loss"}, "less": {"targets": ["arith_dev"]}}
    assert name([], {"dataflex": {"component_name": None}}) == "static"
    assert name(["dynamic_weight"], base) == "dynamic_weight:loss"
    assert name(["less"], base) == "less:arith_dev"
    assert name(["less"], {**base, "less": {"targets": ["reverse_dev", ["arith_dev", "sort_dev"]]}}) == (
        "less:reverse_dev,arith_dev+sort_dev"
    )
    ss = {**base, "static_select": {"selector": "near", "targets": ["arith_dev"]}}
    assert name(["static_select"], ss) == "static_select:near:arith_dev"
    assert name(["less"], None) is None  # outside a run: kedro-mlflow's own default


def test_final_train_loss_averages_at_least_a_full_logging_window():
    from dataflex.train.trainer.loop import Trainer

    def final(history: list[dict], logging_steps: int) -> float | None:
        stub = SimpleNamespace(log_history=history, args=SimpleNamespace(logging_steps=logging_steps))
        return Trainer._final_train_loss(stub)

    full = [{"step": 10, "loss": 4.0}, {"step": 20, "loss": 2.0}]
    assert final(full, 10) == pytest.approx(2.0)  # the last window is full: its mean
    # 23 steps, logging every 10: the last full window (steps 11-20) and the 3 steps after it, steps-weighted.
    partial = [*full, {"step": 21, "eval_loss": 9.0}, {"step": 23, "loss": 1.0}]
    assert final(partial, 10) == pytest.approx((10 * 2.0 + 3 * 1.0) / 13)
    assert final([{"step": 3, "loss": 5.0}], 10) == pytest.approx(5.0)  # shorter than one window: all of it
    assert final([], 10) is None


def test_reporting_leaves_the_matplotlib_backend_alone():
    """A notebook's inline backend survives `import dataflex.reporting` (plots then show); runs pick Agg."""
    code = "import matplotlib; import dataflex.reporting; print(matplotlib.get_backend())"
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "svg"
