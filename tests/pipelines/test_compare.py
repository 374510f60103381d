"""`kedro run --pipelines=compare` on the test-size model: 2 arms x 2 seeds at a 3-step budget, a leaderboard
that has every cell and equals the cells' run_summary.json, one MLflow child run per cell, a resume that reruns
only the missing cell, and bad input refused in one line."""

from __future__ import annotations

import copy
import csv
import io
import json
import statistics
from pathlib import Path

import mlflow
import pytest
import yaml

from dataflex.core.errors import ConfigError
from dataflex.pipelines.compare.cells import plan_cells

ARMS = [
    {"name": "static", "train_type": "static"},
    {
        "name": "random",
        "train_type": "dynamic_select",
        "component_name": "random",
        "warmup_step": 1,
        "update_step": 1,
        "update_times": 1,
    },
]


def _params(project: Path, model: Path, demo: Path) -> dict:
    return {
        "mlflow_uri": f"sqlite:///{project / 'mlflow.db'}",
        "model": {"model_name_or_path": str(model), "lora_rank": 4},
        "data": {
            "dataset_dir": str(demo),
            "dataset": ["arith_train", "reverse_train"],
            "eval_dataset": ["arith_test", "reverse_test"],
            "cutoff_len": 64,
            "max_samples": 16,
        },
        "train": {"per_device_train_batch_size": 4, "logging_steps": 1, "progress_bar": False},
        "eval": {"generate": False},
        "demo": {"build_if_missing": False},
        "compare": {
            "arms": copy.deepcopy(ARMS),
            "seeds": [0, 1],
            "budget_steps": 3,
            "baseline": "static",
            "metric": "loss",
        },
    }


def _run(project: Path, params: dict) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    try:
        with KedroSession.create(project_path=project, runtime_params=params) as session:
            session.run(pipeline_names=["compare"])
    finally:
        while mlflow.active_run():
            mlflow.end_run()


def test_compare_leaderboard_child_runs_and_resume(kedro_project, tiny_model_dir, demo_dir, monkeypatch):
    project = kedro_project
    monkeypatch.chdir(project)
    params = _params(project, tiny_model_dir, demo_dir)
    _run(project, params)

    root = project / "data" / "06_models" / "compare" / "compare"
    summaries = {
        (a["name"], s): json.loads((root / a["name"] / f"seed-{s}" / "run_summary.json").read_text())
        for a in ARMS
        for s in (0, 1)
    }
    assert all(s["global_step"] == 3 for s in summaries.values())  # the equal budget
    reports = project / "data" / "08_reporting" / "compare"
    cells = list(csv.DictReader(io.StringIO((reports / "cells.csv").read_text())))
    assert {(c["arm"], int(c["seed"])) for c in cells} == set(summaries)
    for c in cells:
        s = summaries[(c["arm"], int(c["seed"]))]
        for name in ("arith_test", "reverse_test"):
            assert float(c[f"{name}_loss"]) == pytest.approx(s["eval"][name]["loss"], rel=1e-6)
    board = {r["arm"]: r for r in csv.DictReader(io.StringIO((reports / "leaderboard.csv").read_text()))}
    for arm in ("static", "random"):
        values = [summaries[(arm, s)]["eval"]["arith_test"]["loss"] for s in (0, 1)]
        assert float(board[arm]["arith_test_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-6)
        assert float(board[arm]["arith_test_std"]) == pytest.approx(statistics.stdev(values), rel=1e-5)
    assert float(board["static"]["diff_vs_baseline"]) == 0.0
    assert sorted(int(r["rank"]) for r in board.values()) == [1, 2]
    assert "± " in (reports / "leaderboard.md").read_text()
    assert (reports / "metric_per_arm.png").stat().st_size > 1000

    # MLflow: each cell a child of the Kedro run's own run.
    client = mlflow.tracking.MlflowClient(tracking_uri=params["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("dataflex").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 4 and len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    assert all("eval/arith_test/loss" in r.data.metrics for r in children)

    # Resume: only the cell whose summary is gone runs again.
    def mtimes() -> dict:
        return {k: (root / k[0] / f"seed-{k[1]}" / "run_summary.json").stat().st_mtime_ns for k in summaries}

    before = mtimes()
    (root / "random" / "seed-1" / "run_summary.json").unlink()
    _run(project, params)
    after = mtimes()
    assert [k for k in summaries if after[k] != before[k]] == [("random", 1)]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["arms"].append({"name": "x", "train_type": "dynamic_select", "component_name": "nope"}), "nope"),
        (lambda c: c["arms"].append({"name": "x", "pipeline": "dynamic_nope"}), "unknown mode or pipeline"),
        (lambda c: c["arms"].append({"name": "x", "dataset": "arith_train"}), "allow_different_base"),
        (lambda c: c["arms"].append({"name": "static"}), "duplicate arm name 'static'"),
        (lambda c: c.update(budget_steps=0), "budget_steps must be set"),
        (
            lambda c: c["arms"].append(
                {"name": "x", "train_type": "dynamic_mix", "component_name": "random", "warmup_step": 1}
                | {"update_step": 1, "update_times": 1}
            ),
            "not budget_steps=3",
        ),
    ],
)
def test_bad_compare_input_is_one_line(change, message, untrained_model_dir, demo_dir, tmp_path):
    params = _params(tmp_path, untrained_model_dir, demo_dir)
    change(params["compare"])
    with pytest.raises(ConfigError, match=message) as err:
        plan_cells(params)
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_compare_config_in_one_line(project_root, tmp_path, capsys, untrained_model_dir, demo_dir):
    from dataflex.cli import main

    config = tmp_path / "cmp.yaml"
    flat = {
        "model_name_or_path": str(untrained_model_dir),
        "dataset_dir": str(demo_dir),
        "dataset": "arith_train",
        "compare_arms": copy.deepcopy(ARMS) + [{"name": "static"}],
        "compare_budget_steps": 3,
    }
    config.write_text(yaml.safe_dump(flat))
    code = main(["compare", str(config), "--project-dir", str(project_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "duplicate arm name 'static'" in err[0]
