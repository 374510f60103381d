"""Bad input through `dataflex-cli train`, one case per mistake class: YAML syntax and encoding, types, NaN/inf,
ranges, unknown keys, paths, data files, components files, user modules, resume checkpoints, output dirs, model
files and dynamic-mode settings. Each must end with exit code 2, exactly one `dataflex-cli: error:` line, no
traceback, and nothing new on disk (output_dir, the project's data, the tokenisation cache, the MLflow store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import copy_project

NAN_INF = [
    ("learning_rate=.nan", "train.learning_rate must be a finite number"),
    ("learning_rate=.inf", "train.learning_rate must be a finite number"),
    ("num_train_epochs=.nan", "train.num_train_epochs must be a finite number"),
    ("num_train_epochs=-.inf", "train.num_train_epochs must be a finite number"),
    ("max_grad_norm=.nan", "train.max_grad_norm must be a finite number"),
    ("lora_dropout=.nan", "model.lora_dropout must be a finite number"),
]
TYPES_AND_RANGES = [
    ("learning_rate=-1", "train.learning_rate must be > 0"),
    ("learning_rate=abc", "train.learning_rate"),
    ("warmup_ratio=abc", "train.warmup_ratio"),
    ("warmup_ratio=1.5", "train.warmup_ratio"),
    ("weight_decay=abc", "train.weight_decay"),
    ("weight_decay=-0.1", "train.weight_decay"),
    ("seed=abc", "train.seed"),
    ("seed=-1", "train.seed"),
    ("adam_beta1=5", "train.adam_beta1"),
    ("adam_beta2=1.0", "train.adam_beta2"),
    ("adam_epsilon=-1", "train.adam_epsilon"),
    ("save_steps=0.5", "train.save_steps"),
    ("save_steps=-1", "train.save_steps"),
    ("per_device_train_batch_size=0", "per_device_train_batch_size"),
    ("per_device_train_batch_size=true", "per_device_train_batch_size"),
    ("gradient_accumulation_steps=1.5", "gradient_accumulation_steps"),
    ("logging_steps=0", "logging_steps"),
    ("max_steps=0", "max_steps"),
    ("lr_scheduler_type=nope", "lr_scheduler_type"),
    ("cutoff_len=0", "cutoff_len"),
    ("cutoff_len=abc", "cutoff_len"),
    ("lora_rank=0", "lora_rank"),
    ("lora_alpha=-1", "lora_alpha"),
    ("lora_dropout=1.0", "lora_dropout"),
    ("finetuning_type=qlora", "finetuning_type"),
    ("dtype=fp8", "dtype"),
    ("template=nope", "template"),
    ("stage=rm", "stage"),
    ("val_size=-0.1", "val_size"),
    ("max_samples=0", "max_samples"),
    ("train_type=dynamic_nope", "train_type"),
    ("learning_rte=1", "did you mean learning_rate"),
    ("quantization_bit=4", "quantization_bit"),
    ("lora_target=qq_proj", "lora_target qq_proj matches no linear layer"),
]
DYNAMIC = [
    ("train_type=dynamic_select component_name=nope warmup_step=1 update_step=1", "unknown selector 'nope'"),
    ("train_type=dynamic_weight", "needs component_name"),
    ("train_type=dynamic_select component_name=random warmup_step=0 update_step=1", "warmup_step >= 1"),
    ("train_type=dynamic_mix component_name=random warmup_step=0 update_step=1", "warmup_step >= 1"),
    ("train_type=dynamic_mix static_mix=true mixture_sample_rule=temp", "mixture_sample_rule 'temp'"),
    ("train_type=dynamic_mix static_mix=true init_mixture_proportions=[1.0]", "init_mixture_proportions has 1"),
    ("train_type=dynamic_weight component_name=loss warmup_step=9 train_step=4", "warmup_step (9) > train_step (4)"),
    (  # known only once the pool is: its epoch is shorter than the warm-up (refused after tokenising)
        "train_type=dynamic_mix component_name=random warmup_step=100000 update_step=1 update_times=-1 max_steps=-1",
        "the mixer would never act",
    ),
    (
        "train_type=dynamic_select component_name=random warmup_step=100000 update_step=1 update_times=-1",
        "the selector would never be called",
    ),
    ("train_type=dynamic_weight component_name=adapt eval_dataset=null", "'adapt' needs an eval_dataset"),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "configs" not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def bad_input_env(tmp_path_factory, project_root, demo_dir, untrained_model_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    project = copy_project(project_root, root)
    data = root / "data"
    shutil.copytree(demo_dir, data)
    files = root / "files"
    files.mkdir()
    (files / "not_utf8.yaml").write_bytes(b"mixers:\n  odm: {name: odm, params: {alpha: caf\xe9}}\n")
    (files / "bad.yaml").write_text("mixers: [unclosed\n")
    (files / "delta_abc.yaml").write_text("weighters:\n  loss: {name: loss, params: {delta: abc}}\n")
    (files / "strategy_nope.yaml").write_text("weighters:\n  loss: {name: loss, params: {strategy: nope}}\n")
    (files / "odm_alpha.yaml").write_text("mixers:\n  odm: {name: odm, params: {alpha: 1.5}}\n")
    (files / "share_zero.yaml").write_text(
        "selectors:\n  cluster_less: {name: cluster_less, params: {max_cluster_share: 0}}\n"
    )
    (files / "a_file").write_text("x")
    (files / "no_manifest").mkdir()
    (files / "broken_mod.py").write_text("def broken(:\n")
    (files / "raising_mod.py").write_text("raise RuntimeError('boom at import')\n")
    model = files / "truncated_model"
    shutil.copytree(untrained_model_dir, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    # dataset files that are broken: invalid UTF-8, a symlink loop, malformed JSON
    info = yaml.safe_load((data / "dataset_info.json").read_text())
    (data / "bad_utf8.json").write_bytes(b'[{"instruction": "a", "output": "\xff"}]')
    (data / "loop.json").symlink_to(data / "loop.json")
    (data / "malformed.json").write_text('[{"instruction": "a", "output": }]')
    for name in ("bad_utf8", "loop", "malformed"):
        info[name] = {"file_name": f"{name}.json"}
    # known only after tokenising: every row's roles out of order (sharegpt)
    turns = [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]
    (data / "bad_roles.json").write_text(json.dumps([{"conversations": turns}] * 4))
    info["bad_roles"] = {"file_name": "bad_roles.json", "formatting": "sharegpt"}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1))
    base = {
        "model_name_or_path": str(untrained_model_dir),
        "dataset": "arith_train,reverse_train",
        "eval_dataset": "arith_test",
        "dataset_dir": str(data),
        "cache_dir": str(root / "cache"),
        "cutoff_len": 64,
        "output_dir": str(root / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "lora_rank": 4,
    }
    configs = root / "configs"
    configs.mkdir()
    # The user's tracking store exists already (a refused run must not add a run to it; a new store is not "data").
    from dataflex.tracking import prepare_store

    prepare_store(f"sqlite:///{root / 'mlflow.db'}")
    return {"root": root, "project": project, "files": files, "base": base, "configs": configs}


FILES = [
    ("model_name_or_path=/nonexistent/model", "does not exist"),
    ("model_name_or_path={files}/a_file", "is a file"),
    ("model_name_or_path={files}/truncated_model", "truncated"),
    ("dataset_dir=/nonexistent/data", "dataset_info.json"),
    ("dataset=nope_train", "nope_train"),
    ("eval_dataset=nope_test", "nope_test"),
    ("dataset=bad_utf8", "is not valid UTF-8 (byte"),
    ("dataset=loop", "is a broken link or a link loop"),
    ("dataset=malformed", "malformed JSON"),
    ("output_dir={files}/a_file", "is a file, not a folder"),
    ("output_dir={files}/a_file/sub", "cannot be created"),
    ("resume_from_checkpoint=/nonexistent/checkpoint-3", "does not exist"),
    ("resume_from_checkpoint={files}/no_manifest", "no manifest.json"),
    ("components_cfg_file=/nonexistent.yaml", "does not exist"),
    ("components_cfg_file={files}/bad.yaml", "not valid YAML"),
    (
        "train_type=dynamic_weight component_name=loss components_cfg_file={files}/delta_abc.yaml",
        "weighter 'loss': parameter delta must be a number, got 'abc'",
    ),
    (
        "train_type=dynamic_mix component_name=odm warmup_step=1 update_step=1 "
        "components_cfg_file={files}/not_utf8.yaml",
        "is not valid UTF-8",
    ),
    (
        "train_type=dynamic_weight component_name=loss components_cfg_file={files}/strategy_nope.yaml",
        "weighter 'loss': unknown strategy 'nope'",
    ),
    (
        "train_type=dynamic_mix component_name=odm warmup_step=1 update_step=1 "
        "components_cfg_file={files}/odm_alpha.yaml",
        "mixer 'odm': need 0 <= alpha < 1",
    ),
    (
        "train_type=dynamic_select component_name=cluster_less warmup_step=1 update_step=1 "
        "components_cfg_file={files}/share_zero.yaml",
        "max_cluster_share must be in (0, 1]",
    ),
    # refusals that can only be known after tokenising: no cache entry, no project data, no MLflow run either
    ("cutoff_len=1", "fully masked"),
    ("dataset=bad_roles", "dataset 'bad_roles' is empty after filtering"),
    ("num_processes=2 accelerate_config=nope.yaml", "accelerate_config file"),
    ("deepspeed={files}/nope.json", "deepspeed file"),
    ("train_type=dynamic_weight component_name=x user_modules={files}/broken_mod.py", "failed to import: SyntaxError"),
    ("train_type=dynamic_weight component_name=x user_modules={files}/raising_mod.py", "RuntimeError: boom at import"),
    ("train_type=dynamic_weight component_name=x user_modules=no_such_module_xyz", "cannot import user module"),
]
YAML_FILES = [
    (b"learning_rate: [1, 2\n", "not valid YAML"),
    (b"learning_rate: 1\nname: caf\xe9\n", "is not valid UTF-8 (byte"),
    (b"", "is empty"),
    (b"- a\n- b\n", "must be a mapping"),
]


def _run(env, capsys, yaml_bytes: bytes | None, overrides: list[str]) -> tuple[int, str]:
    from dataflex.cli import main

    path = env["configs"] / "cfg.yaml"
    path.write_bytes(yaml_bytes if yaml_bytes is not None else yaml.safe_dump(env["base"]).encode())
    argv = ["train", str(path), *overrides, "--project-dir", str(env["project"])]
    argv += ["--mlflow-uri", f"sqlite:///{env['root'] / 'mlflow.db'}"]
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def _check(env, capsys, yaml_bytes, overrides, expected):
    before = _files(env["root"])
    rc, err = _run(env, capsys, yaml_bytes, overrides)
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert rc == 2, (overrides, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("dataflex-cli: error: "), err[-2000:]
    assert expected in lines[0], lines[0]
    assert _files(env["root"]) == before, sorted(_files(env["root"]) - before)


@pytest.mark.parametrize("override, expected", NAN_INF + TYPES_AND_RANGES + DYNAMIC)
def test_a_bad_value_is_one_line_and_writes_nothing(bad_input_env, capsys, override, expected):
    _check(bad_input_env, capsys, None, override.split(), expected)


@pytest.mark.parametrize("override, expected", FILES)
def test_a_bad_file_or_path_is_one_line_and_writes_nothing(bad_input_env, capsys, override, expected):
    overrides = override.format(files=bad_input_env["files"]).split()
    _check(bad_input_env, capsys, None, overrides, expected)


@pytest.mark.parametrize("content, expected", YAML_FILES)
def test_a_bad_yaml_is_one_line_and_writes_nothing(bad_input_env, capsys, content, expected):
    _check(bad_input_env, capsys, content, [], expected)


def test_the_matrix_covers_at_least_sixty_distinct_mistakes():
    assert len(NAN_INF + TYPES_AND_RANGES + DYNAMIC + FILES + YAML_FILES) >= 60
