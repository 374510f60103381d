"""Runs that meet: two `dataflex-cli train` processes in one project on different configs, sharing one new MLflow
database, both finish and are both recorded; a second process on a busy output_dir is refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _start(root: Path, project: Path, name: str, cfg: dict, db: Path) -> subprocess.Popen:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "dataflex.cli", "train", str(path), "--project-dir", str(project)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KEDRO_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen(
        [*cli, "--mlflow-uri", f"sqlite:///{db}"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_runs_in_one_project_and_one_new_mlflow_db(kedro_project, demo_dir, untrained_model_dir, tmp_path):
    project = kedro_project
    db = tmp_path / "mlflow.db"  # does not exist yet: both runs would create it
    base = {
        "model_name_or_path": str(untrained_model_dir),
        "dataset_dir": str(demo_dir),
        "cutoff_len": 64,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "lora_rank": 4,
        "progress_bar": False,
    }
    one = {**base, "dataset": "arith_train", "output_dir": str(tmp_path / "one"), "eval_dataset": "arith_test"}
    two = {**base, "dataset": "reverse_train,sort_train", "output_dir": str(tmp_path / "two"), "learning_rate": 1e-3}
    runs = [_start(tmp_path, project, "one", one, db), _start(tmp_path, project, "two", two, db)]
    outputs = [p.communicate(timeout=600) for p in runs]
    for p, (_out, err) in zip(runs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads((tmp_path / n / "run_summary.json").read_text()) for n in ("one", "two")]
    assert [s["global_step"] for s in summaries] == [3, 3]
    pools = [json.loads((tmp_path / n / "data" / "train_pool_stats.json").read_text()) for n in ("one", "two")]
    assert set(pools[0]["domains"]) == {"arith_train"} and set(pools[1]["domains"]) == {"reverse_train", "sort_train"}
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    for s in summaries:
        assert client.get_run(s["mlflow_run_id"]).info.status == "FINISHED"


def test_a_second_run_on_a_busy_output_dir_is_refused(kedro_project, demo_dir, untrained_model_dir, tmp_path):
    """The first run holds the output_dir's lock (here: a process holding it, as a long training would); the
    CLI refuses the second with one line naming the holder, and writes nothing there."""
    project = kedro_project
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from dataflex.utils.lock import RunLock; RunLock({str(out)!r}).acquire(); "
            "print('locked', flush=True); import time; time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = {
            "model_name_or_path": str(untrained_model_dir),
            "dataset_dir": str(demo_dir),
            "dataset": "arith_train",
            "output_dir": str(out),
            "max_steps": 1,
        }
        started = time.monotonic()
        second = _start(tmp_path, project, "second", cfg, tmp_path / "m.db")
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-2000:]
        lines = [line for line in err.strip().splitlines() if "error:" in line]
        assert len(lines) == 1 and f"is in use by another run (pid {holder.pid}" in lines[0], err[-2000:]
        assert "Traceback" not in err and not out.exists()
        assert time.monotonic() - started < 300
    finally:
        holder.kill()
        holder.wait()
