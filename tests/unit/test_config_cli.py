"""DataFlex flat YAML -> grouped parameters, and every bad input: one clear line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dataflex.cli import main
from dataflex.config import IGNORED_KEYS, default_params, flat_to_grouped, parse_overrides, validate_params
from dataflex.core.errors import ConfigError


def _flat(demo_dir: Path, model_dir: Path, out: Path, **kw) -> dict:
    cfg = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "dataset": "arith_train,reverse_train",
        "eval_dataset": "arith_test",
        "dataset_dir": str(demo_dir),
        "template": "default",
        "cutoff_len": 64,
        "output_dir": str(out),
        "per_device_train_batch_size": 8,
        "learning_rate": 1.0e-3,
        "max_steps": 4,
        "train_type": "static",
        "report_to": "none",
        "ddp_timeout": 180000000,
        "plot_loss": True,
    }
    cfg.update(kw)
    return cfg


def _write(tmp_path: Path, cfg: dict | str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def test_flat_keys_map_to_groups(demo_dir, untrained_model_dir, tmp_path):
    params = flat_to_grouped(
        _flat(
            demo_dir,
            untrained_model_dir,
            tmp_path / "out",
            bf16=True,
            warmup_step=3,
            component_name="loss",
            gradient_accumulation_steps=2,
        )
    )
    assert params["model"]["lora_rank"] == 4
    assert params["data"]["dataset"] == "arith_train,reverse_train"
    assert params["train"]["gradient_accumulation_steps"] == 2
    assert params["train"]["mixed_precision"] == "bf16"
    assert params["dataflex"]["warmup_step"] == 3 and params["dataflex"]["component_name"] == "loss"
    assert "ddp_timeout" not in json.dumps(params)
    validate_params(params)


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["learning_rate=5e-5", "warmup_step=20", "bf16=true", "dataset=a,b", "x="]) == {
        "learning_rate": 5e-5,
        "warmup_step": 20,
        "bf16": True,
        "dataset": "a,b",
        "x": None,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["learning_rate"])


def test_ignored_keys_are_not_mapped():
    assert not IGNORED_KEYS & set(flat_to_grouped({})["train"])


BAD = [
    ({"lora_rnak": 8}, "unknown config key.*lora_rnak"),
    ({"quantization_bit": 4}, "quantization_bit are not supported by this version"),
    ({"optim": "sgd"}, "optim are not supported"),
    ({"dataset": None}, "dataset is missing"),
    ({"dataset": "arith_train,nope_train"}, "nope_train"),
    ({"cutoff_len": 0}, "cutoff_len must be an integer >= 1"),
    ({"template": "vicuna9"}, "unknown template 'vicuna9'"),
    ({"train_type": "dynamic_foo"}, "unknown train_type 'dynamic_foo'; valid: static, dynamic_select"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive integer"),
    ({"per_device_train_batch_size": -2}, "per_device_train_batch_size must be a positive integer"),
    ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
    ({"lora_rank": 0}, "lora_rank must be a positive integer"),
    ({"finetuning_type": "freeze"}, "finetuning_type 'freeze' is not valid"),
    ({"stage": "dpo"}, "stage 'dpo' is not valid"),
    ({"model_name_or_path": "/nonexistent/model"}, "does not exist"),
    ({"model_name_or_path": "some-org/not-cached-model"}, "not in the Hugging Face cache.*offline"),
    ({"resume_from_checkpoint": "/nonexistent/checkpoint-3"}, "checkpoint '/nonexistent/checkpoint-3' does not exist"),
    ({"components_cfg_file": "/nonexistent/components.yaml"}, "components_cfg_file"),
    ({"train_type": "dynamic_weight"}, "needs component_name"),
    ({"train_type": "dynamic_weight", "component_name": "lossy"}, "unknown weighter 'lossy'"),
    ({"train_type": "dynamic_weight", "component_name": "loss", "warmup_step": 9, "train_step": 4}, "warmup_step"),
    ({"train_type": "dynamic_weight", "component_name": "loss", "warmup_step": -1}, "warmup_step must be"),
    ({"train_type": "dynamic_weight", "component_name": "adapt", "eval_dataset": None}, "adapt' needs an eval_data"),
]


@pytest.mark.parametrize("bad, match", BAD, ids=[next(iter(b)) + "-" + str(i) for i, (b, _) in enumerate(BAD)])
def test_bad_config_one_line_exit_2(bad, match, demo_dir, untrained_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = _write(tmp_path, _flat(demo_dir, untrained_model_dir, out, **bad))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dataflex-cli: error: ")
    assert __import__("re").search(match, err), err
    assert not out.exists()  # nothing written


def _corpus_copy(demo_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "corpus"
    shutil.copytree(demo_dir, copy)
    return copy


@pytest.mark.parametrize("case", ["missing_file", "malformed_json", "malformed_jsonl", "missing_column", "empty"])
def test_bad_data_one_line_exit_2(case, demo_dir, untrained_model_dir, tmp_path, capsys):
    corpus = _corpus_copy(demo_dir, tmp_path)
    info = json.loads((corpus / "dataset_info.json").read_text())
    arith = corpus / info["arith_train"]["file_name"]
    dataset = "arith_train,reverse_train"
    if case == "missing_file":
        arith.unlink()
        match = "does not exist|not found|missing"
    elif case == "malformed_json":
        text = arith.read_text().splitlines()
        text[3] = text[3] + ' "broken'
        arith.write_text("\n".join(text))
        match = r"arith_train\.json:4:"
    elif case == "malformed_jsonl":
        name = info["text_stories_train"]["file_name"]
        lines = (corpus / name).read_text().splitlines()
        lines[2] = "{not json"
        (corpus / name).write_text("\n".join(lines) + "\n")
        dataset = "text_stories_train"
        match = r"text_stories_train\.jsonl:3"
    elif case == "missing_column":
        rows = json.loads(arith.read_text())
        del rows[5]["output"]
        arith.write_text(json.dumps(rows))
        match = "output"
    else:
        arith.write_text("[]")
        match = "no rows"
    stage = "pt" if case == "malformed_jsonl" else "sft"
    cfg = _write(
        tmp_path, _flat(corpus, untrained_model_dir, tmp_path / "out", dataset=dataset, stage=stage, eval_dataset=None)
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dataflex-cli: error: "), err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ("model_name_or_path: [unclosed\n", "not valid YAML at line"),
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_malformed_yaml(content, match, tmp_path, capsys):
    assert main(["train", str(_write(tmp_path, content))]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_missing_yaml_and_usage(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_dynamic_select_without_a_selector_is_one_line(demo_dir, untrained_model_dir, tmp_path, capsys):
    cfg = _write(
        tmp_path,
        _flat(
            demo_dir, untrained_model_dir, tmp_path / "out", train_type="dynamic_select", warmup_step=1, update_step=1
        ),
    )
    assert main(["train", str(cfg)]) == 2
    assert "needs component_name (a registered selector)" in capsys.readouterr().err


def test_version(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("dataflex ")


def test_relative_paths_resolve_against_cwd(demo_dir, untrained_model_dir, tmp_path, monkeypatch):
    from dataflex.cli import build_train_params

    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path, _flat(demo_dir, untrained_model_dir, Path("rel_out")))
    params = build_train_params(str(cfg), [])
    assert params["train"]["output_dir"] == str(tmp_path / "rel_out")


def test_relative_inputs_resolve_against_cwd_then_the_yaml_folder_then_the_project(
    demo_dir, untrained_model_dir, tmp_path, monkeypatch
):
    """A DataFlex YAML names `data` and `src/dataflex/configs/components.yaml` relative to its checkout; run from
    elsewhere they are found next to the YAML, and the working directory wins when both have them."""
    import shutil

    from dataflex.cli import build_train_params

    checkout, elsewhere, project = tmp_path / "checkout", tmp_path / "elsewhere", tmp_path / "project"
    shutil.copytree(demo_dir, checkout / "data")
    (checkout / "components.yaml").write_text("weighters: {}\n")
    (project / "mods").mkdir(parents=True)
    (project / "mods" / "my_components.py").write_text("X = 1\n")
    elsewhere.mkdir()
    flat = {**_flat(demo_dir, untrained_model_dir, Path("out")), "dataset_dir": "data"}
    flat.update(components_cfg_file="components.yaml", user_modules=["mods/my_components.py"])
    cfg = _write(checkout, flat)
    monkeypatch.chdir(elsewhere)
    params = build_train_params(str(cfg), [], project=project)
    assert params["data"]["dataset_dir"] == str(checkout / "data")
    assert params["dataflex"]["components_cfg_file"] == str(checkout / "components.yaml")
    assert params["dataflex"]["user_modules"] == [str(project / "mods" / "my_components.py")]
    assert params["train"]["output_dir"] == str(elsewhere / "out"), "outputs stay relative to the working dir"
    shutil.copytree(demo_dir, elsewhere / "data")
    assert build_train_params(str(cfg), [], project=project)["data"]["dataset_dir"] == str(elsewhere / "data")


def test_overrides_may_follow_options(demo_dir, untrained_model_dir, tmp_path, capsys):
    """`train X.yaml --pipeline less key=value` (the README's form): the override after the option is read."""
    cfg = _write(tmp_path, _flat(demo_dir, untrained_model_dir, tmp_path / "out"))
    assert main(["train", str(cfg), "--pipeline", "less", "learning_rte=1"]) == 2
    assert "did you mean learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["version", "a=b"])
    assert exit_info.value.code == 2 and "unrecognized arguments: a=b" in capsys.readouterr().err


def test_grouped_params_reject_unknown_keys():
    params = default_params()
    params["train"]["learning_rte"] = 1
    with pytest.raises(ConfigError, match="train.learning_rte"):
        validate_params(params, check_paths=False)


def test_config_reference_documents_every_key(project_root):
    """The generated key reference names every grouped key, flat alias, ignored and refused key."""
    from dataflex.config import DEFAULTS, FLAT_KEYS, UNSUPPORTED_KEYS

    readme = (project_root / "docs" / "config.md").read_text()
    names = {k for group in DEFAULTS.values() for k in group} | set(FLAT_KEYS) | IGNORED_KEYS | UNSUPPORTED_KEYS
    missing = sorted(k for k in names if f"`{k}`" not in readme)
    assert not missing, f"docs/config.md does not document: {missing}"


def test_the_demos_component_settings_never_reach_a_cli_run(project_root):
    """Kedro merges runtime params over parameters.yml: a dataflex-cli run's components file (or none) replaces
    the demo's, so a user's component gets the user's values and the demo's `odm.warmup_steps: 20` never leaks."""
    from kedro.config import OmegaConfigLoader

    from dataflex.config import flat_to_grouped
    from dataflex.core.components_cfg import component_spec, load_components_cfg
    from dataflex.settings import CONFIG_LOADER_ARGS  # conf/ uses the project's resolvers

    def merged(flat):
        runtime = flat_to_grouped(flat)
        loader = OmegaConfigLoader(
            str(project_root / "conf"), runtime_params=runtime, **CONFIG_LOADER_ARGS
        )  # the CLI passes every group as runtime params
        return loader["parameters"]["dataflex"]

    demo = OmegaConfigLoader(str(project_root / "conf"), **CONFIG_LOADER_ARGS)["parameters"]
    demo_cfg = load_components_cfg(str(project_root / demo["dataflex"]["components_cfg_file"]), None)
    assert component_spec(demo_cfg, "mixer", "odm")[1] == {"warmup_steps": 20}  # the demo's own setting
    flex = merged({"component_name": "odm"})
    assert component_spec(load_components_cfg(flex["components_cfg_file"], flex["components"]), "mixer", "odm") == (
        "odm",
        {},
    )
