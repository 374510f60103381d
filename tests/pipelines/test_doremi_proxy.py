"""DoReMi with a small proxy: the `doremi` pipeline trains reference and proxy on `doremi.proxy_model_name_or_path`
and the final run on `model_name_or_path` (a larger model with its own tokenizer), the proxy's averaged weights
being the final run's mixture. Also the mix mode's logged step-0 proportions: what round 0 trained on."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

DOMAINS = "text_stories_train,text_numbers_train,text_noisy_train"


def _end_runs() -> None:
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def large_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """The default-size tiny model (4 layers, hidden 256) next to the test-size proxy (2 layers, hidden 64);
    untrained: the test is about which model each step trains."""
    from dataflex.train.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny_default"
    make_tiny_model(out, demo_dir, size="default", seed=0, pretrain_steps=0, progress_bar=False)
    return out


def _base(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def _hidden(model_dir: str | Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]


def test_doremi_pipeline_with_a_smaller_proxy_model(
    kedro_project, demo_dir, untrained_model_dir, large_model_dir, tmp_path, monkeypatch
):
    from dataflex.cli import main
    from dataflex.data import tokenizer_fingerprint
    from dataflex.models import load_tokenizer

    # Different sizes, different tokenizers (the vocabulary is trained per size): the proxy steps get their own pool.
    assert _hidden(untrained_model_dir) < _hidden(large_model_dir)
    proxy_tok, large_tok = load_tokenizer(str(untrained_model_dir)), load_tokenizer(str(large_model_dir))
    assert tokenizer_fingerprint(proxy_tok) != tokenizer_fingerprint(large_tok)

    monkeypatch.chdir(tmp_path)
    cfg = {
        "model_name_or_path": str(large_model_dir),
        "doremi_proxy_model_name_or_path": str(untrained_model_dir),
        "stage": "pt",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 32,
        "dataset": DOMAINS,
        "eval_dataset": "text_noisy_test",
        "output_dir": "saves/doremi",
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "learning_rate": 1.0e-2,
        "train_type": "dynamic_mix",
        "static_mix": True,
        "train_step": 4,
    }
    (tmp_path / "doremi.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--project-dir", str(kedro_project), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["train", "doremi.yaml", "--pipeline", "doremi", *argv]) == 0
    _end_runs()

    out = tmp_path / "saves" / "doremi"
    # Reference and proxy trained the small model, the final run the large one.
    assert _base(out / "reference" / "adapter") == str(untrained_model_dir)
    assert _base(out / "proxy" / "adapter") == str(untrained_model_dir)
    assert _base(out / "adapter") == str(large_model_dir)
    steps = {s: json.loads((out / "doremi" / f"{s}_result.json").read_text()) for s in ("reference", "proxy")}
    assert {s: r["model_name_or_path"] for s, r in steps.items()} == {s: str(untrained_model_dir) for s in steps}
    result = json.loads((out / "train_result.json").read_text())
    assert result["model_name_or_path"] == str(large_model_dir) and result["global_step"] == 4
    from safetensors.torch import load_file

    lora = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {t.shape[-1] for k, t in lora.items() if "lora_A" in k and "q_proj" in k} == {_hidden(large_model_dir)}

    # The proxy's averaged weights (moved away from uniform by the excess loss) are the final run's mixture.
    weights = json.loads((out / "mixture" / "doremi_weights.json").read_text())
    assert weights["updates"] == 4 and weights["average_weights"] != pytest.approx([1 / 3] * 3, abs=1e-6)
    final = [json.loads(x) for x in (out / "mixture" / "proportions.jsonl").read_text().splitlines()]
    assert final[0]["step"] == 0 and final[0]["proportions"] == pytest.approx(weights["average_weights"])
    assert result["doremi_average_weights"] == pytest.approx(weights["average_weights"])


def test_the_logged_step_0_proportions_are_those_round_0_trained_on(
    kedro_project, demo_dir, untrained_model_dir, tmp_path, monkeypatch
):
    """ODM sets its own initial_proportions: the step-0 line of proportions.jsonl is them (it logged
    init_mixture_proportions), equal to what the round-0 sampler drew with, read back from its checkpoint."""
    from dataflex.cli import main

    monkeypatch.chdir(tmp_path)
    odm = {"name": "odm", "params": {"warmup_steps": 2, "initial_proportions": [0.6, 0.2, 0.2]}}
    (tmp_path / "odm_components.yaml").write_text(yaml.safe_dump({"mixers": {"odm": odm}}))
    cfg = {
        "model_name_or_path": str(untrained_model_dir),
        "stage": "pt",
        "dataset_dir": str(demo_dir),
        "cutoff_len": 32,
        "dataset": DOMAINS,
        "output_dir": "saves/odm",
        "per_device_train_batch_size": 5,
        "logging_steps": 2,
        "train_type": "dynamic_mix",
        "component_name": "odm",
        "components_cfg_file": "odm_components.yaml",
        "init_mixture_proportions": [0.2, 0.4, 0.4],
        "warmup_step": 2,
        "update_step": 1,
        "update_times": 1,
    }
    (tmp_path / "odm.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["--project-dir", str(kedro_project), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["train", "odm.yaml", *argv]) == 0
    _end_runs()

    out = tmp_path / "saves" / "odm"
    lines = [json.loads(x) for x in (out / "mixture" / "proportions.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2]
    assert lines[0]["proportions"] == pytest.approx([0.6, 0.2, 0.2])
    # What the manager sampled round 0 with (ODM is still warming up there, so the proportions are constant):
    # its state in round 0's checkpoint, and the rows it drew, 2 steps x 5 rows at (0.6, 0.2, 0.2) = (6, 2, 2).
    state = json.loads((out / "rounds" / "round_0" / "checkpoint" / "trainer_state.json").read_text())
    manager = state["plan"]["manager"]
    assert manager["proportions"] == pytest.approx(lines[0]["proportions"], abs=0)
    assert manager["drawn"] == [6, 2, 2]
