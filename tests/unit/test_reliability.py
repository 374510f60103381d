"""Run isolation and safety: one run per output_dir, stale temp files of killed writes, the base model of a
resumed checkpoint, an output_dir that cannot be written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.train.trainer.state import check_base
from dataflex.utils.io import remove_stale_temp
from dataflex.utils.lock import RunLock


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    probe = (
        "import sys\n"
        "from dataflex.utils.lock import RunLock\n"
        "from dataflex.core.errors import ConfigError\n"
        "try:\n"
        f"    RunLock({str(out)!r}).acquire()\n"
        "except ConfigError as exc:\n"
        "    print(exc); sys.exit(2)\n"
    )
    with RunLock(out):
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert done.returncode == 2
        line = done.stdout.strip()
        assert "\n" not in line and f"output_dir {out.resolve()} is in use by another run (pid " in line
        assert not out.exists()  # the lock writes nothing into the output_dir
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0  # released (and a killed holder releases it too: the kernel drops flocks)


def test_stale_temp_files_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".checkpoint-3.x1y2.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".checkpoint-3.x1y2.tmp" / "trainable.safetensors").write_bytes(b"half")
    (tmp_path / ".train_result.json.ab12.tmp").write_text("{")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir()
    assert remove_stale_temp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint-2", "checkpoints"]
    assert remove_stale_temp(tmp_path / "missing") == 0


def test_a_checkpoint_of_another_base_model_is_refused_unless_allowed():
    manifest = {"model_fingerprint": "aaaa" * 16}
    check_base(manifest, "aaaa" * 16, "ckpt")
    with pytest.raises(CheckpointError, match="trained on another base model .*allow_different_base: true"):
        check_base(manifest, "bbbb" * 16, "ckpt")
    check_base(manifest, "bbbb" * 16, "ckpt", allow=True)
    check_base({}, "bbbb" * 16, "ckpt")  # checkpoints of older versions carry no fingerprint


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    from dataflex.config.validate import check_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot be created"):
        check_output_dir(str(tmp_path / "file" / "sub"))
    check_output_dir(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "env, runtime, expected",
    [
        ({}, None, "sqlite:///mlflow.db"),
        ({"MLFLOW_TRACKING_URI": "sqlite:///from_env.db"}, None, "sqlite:///from_env.db"),
        ({"MLFLOW_TRACKING_URI": "sqlite:///from_env.db"}, {"mlflow_uri": "sqlite:///cli.db"}, "sqlite:///cli.db"),
    ],
)
def test_the_mlflow_store_honours_the_environment(project_root, monkeypatch, env, runtime, expected):
    from kedro.config import OmegaConfigLoader

    from dataflex.settings import CONFIG_LOADER_ARGS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = {**CONFIG_LOADER_ARGS, "config_patterns": {**CONFIG_LOADER_ARGS["config_patterns"], "mlflow": ["mlflow*"]}}
    loader = OmegaConfigLoader(str(project_root / "conf"), runtime_params=runtime, **args)
    assert loader["mlflow"]["server"]["mlflow_tracking_uri"] == expected


@pytest.mark.parametrize(
    "code, expected",
    [
        ("def broken(:\n", "user module {path} failed to import: SyntaxError: "),
        ("raise RuntimeError('boom')\n", "user module {path} failed to import: RuntimeError: boom (bad_mod.py:1)"),
        ("import no_such_package_xyz\n", "user module {path} failed to import: ModuleNotFoundError: "),
        ("x = undefined_name\n", "user module {path} failed to import: NameError: "),
    ],
)
def test_a_user_module_that_fails_to_import_is_one_line(tmp_path, code, expected):
    from dataflex.core.registry import import_user_modules

    path = tmp_path / "bad_mod.py"
    path.write_text(code)
    with pytest.raises(ConfigError) as err:
        import_user_modules([str(path)])
    assert str(err.value).startswith(expected.format(path=path)) and "\n" not in str(err.value)
    assert "dataflex_user_bad_mod" not in sys.modules


def test_an_output_dir_holding_a_run_is_refused_unless_overwritten_or_resumed(tmp_path):
    from dataflex.utils.lock import claim_output_dir

    out = tmp_path / "run"
    assert claim_output_dir(out, overwrite=False, resuming=False) is False  # new folder: nothing to claim
    (out / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (out / "run_summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run .*overwrite_output_dir: true"):
        claim_output_dir(out, overwrite=False, resuming=False)
    assert (out / "run_summary.json").exists()  # refused: untouched
    assert claim_output_dir(out, overwrite=False, resuming=True) is False  # a resume continues it
    assert claim_output_dir(out, overwrite=True, resuming=False) is True
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # old run gone, no stale checkpoint-3 left
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "run_summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="looks like a project folder"):
        claim_output_dir(tmp_path, overwrite=True, resuming=False)


def test_bad_files_are_one_line(tmp_path, untrained_model_dir):
    """Invalid UTF-8 (with the byte offset), a symlink loop, a folder where a file belongs, a truncated
    safetensors file and a lora_target the architecture lacks: each one line, found before any work."""
    import shutil

    from dataflex.config import load_yaml_config
    from dataflex.core.errors import DataError
    from dataflex.data.readers import read_file
    from dataflex.models.loader import check_lora_target, check_model_path

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"learning_rate: 1\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid UTF-8 \(byte 26"):
        load_yaml_config(bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"instruction": "a", "output": "\xff"}\n')
    with pytest.raises(DataError, match=r"dataset 'd': file .*rows.jsonl is not valid UTF-8 \(byte 32"):
        read_file(rows, dataset="d")
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match="loop.json cannot be read: Too many levels of symbolic links"):
        read_file(loop, dataset="d")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DataError, match="folder.json is a folder, not a file"):
        read_file(tmp_path / "folder.json", dataset="d")

    model = tmp_path / "model"
    shutil.copytree(untrained_model_dir, model)
    check_model_path(str(model))
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="is truncated"):
        check_model_path(str(model))
    check_lora_target(str(untrained_model_dir), "q_proj,v_proj")
    with pytest.raises(ConfigError, match="lora_target qq_proj matches no linear layer"):
        check_lora_target(str(untrained_model_dir), "q_proj,qq_proj")


def test_a_tracking_failure_mid_run_is_one_warning_and_never_fatal(tmp_path, monkeypatch, caplog):
    import mlflow

    import dataflex.tracking as tracking

    monkeypatch.setattr(tracking, "_failed", [])
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # restored after the test
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(experiment_id=mlflow.create_experiment("tracking-failure")):
        sink = tracking.mlflow_metrics_sink()
        sink({"loss": 1.0}, 1)

        def broken(*args, **kwargs):
            raise OSError("database is locked")

        monkeypatch.setattr(mlflow, "log_metrics", broken)
        with caplog.at_level("WARNING", logger="dataflex"):
            sink({"loss": 0.9}, 2)
            tracking.log_metrics({"x": 1.0})
            tracking.log_mixture([{"step": 0, "names": ["a"], "proportions": [1.0]}])
    warnings = [r.getMessage() for r in caplog.records if "MLflow tracking failed" in r.getMessage()]
    assert len(warnings) == 1 and "database is locked" in warnings[0]


def test_component_value_checks_run_at_config_time():
    """`REGISTRY.check` (config validation, before any data) runs the component's own `check_params`."""
    from dataflex.core.registry import REGISTRY

    cases = [
        ("weighter", "loss", {"strategy": "nope"}, "unknown strategy 'nope'"),
        ("weighter", "loss", {"r": -1.0}, "delta and r must be > 0"),
        ("weighter", "adapt", {"tau": 0.0}, "tau and clip must be > 0"),
        ("selector", "loss", {"quantiles": [0.7, 0.2]}, "quantiles must be two increasing"),
        ("selector", "delta_loss", {"window_size": 2.0}, "window_size must be in"),
        ("selector", "tsds", {"alpha": 1.5}, "alpha must be"),
        ("selector", "cluster_less", {"n_clusters": 0}, "n_clusters must be an integer"),
        ("selector", "nice", {"policy_model_path": "m", "mc_samples": 0}, "mc_samples must be"),
        ("mixer", "odm", {"alpha": 1.0}, "0 <= alpha < 1"),
        ("mixer", "doremi", {"reweight_eta": 0.0}, "reweight_eta must be > 0"),
    ]
    for kind, name, params, message in cases:
        with pytest.raises(ConfigError, match=message):
            REGISTRY.check(kind, name, params)
    REGISTRY.check("weighter", "loss", {"strategy": "quadratic", "delta": 0.5, "r": 2.0})  # valid: no error
