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


def _summaries(project: Path, arms: list[str], seeds: list[int]) -> dict:
    root = project / "data" / "06_models" / "compare" / "compare"
    return {(a, s): json.loads((root / a / f"seed-{s}" / "run_summary.json").read_text()) for a in arms for s in seeds}


def test_compare_selector_arms_share_the_less_caches(kedro_project, tiny_model_dir, demo_dir, monkeypatch):
    """Two LESS arms (differing only in percentage) x 2 seeds: one warm-up and one pool datastore for all four
    cells; a static_select (near) arm and a dynamic_weight arm run next to them at the same budget."""
    project = kedro_project
    monkeypatch.chdir(project)
    params = _params(project, tiny_model_dir, demo_dir)
    less = {"pipeline": "less", "less_warmup_epochs": 1, "less_warmup_percentage": 0.25, "less_proj_dim": 64}
    params["compare"].update(
        budget_steps=2,
        baseline="less_a",
        arms=[
            {"name": "less_a", **less, "less_percentage": 0.25},
            {"name": "less_b", **less, "less_percentage": 0.5},
            {"name": "near", "pipeline": "static_select", "static_select_selector": "near"}
            | {"static_select_percentage": 0.25},
            {"name": "weight", "train_type": "dynamic_weight", "component_name": "loss", "warmup_step": 1},
        ],
    )
    _run(project, params)

    summaries = _summaries(project, ["less_a", "less_b", "near", "weight"], [0, 1])
    assert all(s["global_step"] == 2 for s in summaries.values())  # the equal budget, whatever the arm
    caches = [summaries[(a, s)]["caches"] for a in ("less_a", "less_b") for s in (0, 1)]
    # The first LESS cell computes the warm-up and the pool's datastore; the other three reuse both.
    assert sorted(c["warmup_cache"] for c in caches) == ["hit", "hit", "hit", "miss"]
    assert sorted(c["datastore_hits"] for c in caches) == [0, 1, 1, 1]
    assert all(c["datastore_checkpoints"] == 1 for c in caches)
    sizes = {a: sum(summaries[(a, 0)]["selection_composition"].values()) for a in ("less_a", "less_b", "near")}
    assert sizes["less_b"] > sizes["less_a"] > 0 and sizes["near"] > 0
    assert summaries[("weight", 0)]["train_type"] == "dynamic_weight"
    assert all(s["feature_seconds"] > 0 for k, s in summaries.items() if k[0] != "weight")


def test_compare_mixer_arms(kedro_project, tiny_model_dir, demo_dir, monkeypatch):
    """Mixers on the demo's text domains at one 4-step budget: static-uniform, the DoReMi recipe (reference and
    proxy are the arm's feature cost), and the odm and doremi mixers of dynamic_mix."""
    project = kedro_project
    monkeypatch.chdir(project)
    params = _params(project, tiny_model_dir, demo_dir)
    params["data"].update(
        stage="pt",
        cutoff_len=32,
        dataset=["text_stories_train", "text_numbers_train", "text_noisy_train"],
        eval_dataset=["text_noisy_test"],
    )
    mix = {"train_type": "dynamic_mix", "warmup_step": 2, "update_step": 1, "update_times": 2}
    reference = {"reference_model_path": str(tiny_model_dir)}
    params["compare"].update(
        budget_steps=4,
        seeds=[0],
        arms=[
            {"name": "static", "train_type": "dynamic_mix", "static_mix": True},
            {"name": "doremi", "pipeline": "doremi", "doremi_proxy_model_name_or_path": str(tiny_model_dir)},
            {"name": "odm", **mix, "component_name": "odm"},
            {"name": "doremi_mixer", **mix, "component_name": "doremi"}
            | {"components": {"mixers": {"doremi": {"name": "doremi", "params": reference}}}},
        ],
    )
    _run(project, params)

    summaries = _summaries(project, ["static", "doremi", "odm", "doremi_mixer"], [0])
    assert all(s["global_step"] == 4 for s in summaries.values())
    for arm in ("doremi", "odm", "doremi_mixer"):
        assert summaries[(arm, 0)]["mixture_history"], arm
    assert summaries[("doremi", 0)]["feature_seconds"] > 0
    assert "text_noisy_test" in summaries[("static", 0)]["eval"]


@pytest.mark.parametrize(
    "arm, message",
    [
        ({"name": "x", "train_type": "dynamic_select", "component_name": "nope"}, "compare arm 'x': unknown selector"),
        ({"name": "x", "dataset": "arith_train"}, "trains a different base model or pool than arm 'static'"),
        ({"name": "x", "train_type": "dynamic_weight", "component_name": "loss", "warmup_step": 5}, "budget_steps=3"),
    ],
)
def test_kedro_run_bad_compare_arm_is_one_line(arm, message, kedro_project, untrained_model_dir, demo_dir, monkeypatch):
    """Arm-level mistakes under `kedro run --pipelines=compare`: the hook's one line before any node runs."""
    project = kedro_project
    monkeypatch.chdir(project)
    params = _params(project, untrained_model_dir, demo_dir)
    params["compare"]["arms"].append(arm)
    with pytest.raises(SystemExit) as exc:
        _run(project, params)
    text = str(exc.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not (project / "data" / "06_models" / "compare" / "compare").exists()  # no cell started


@pytest.mark.parametrize("example", ["demo.yaml", "mixers.yaml", "selectors.yaml"])
def test_compare_examples_plan(example, project_root, untrained_model_dir, demo_dir, tmp_path, monkeypatch, capsys):
    """Each example's arms x seeds pass every check (planned only: running them is minutes), and a bad key on
    its command line is one line, exit 2."""
    from dataflex.cli import build_train_params, main

    monkeypatch.chdir(tmp_path)
    config = project_root / "examples" / "compare" / example
    paths = [f"model_name_or_path={untrained_model_dir}", f"dataset_dir={demo_dir}"]
    paths.append(f"doremi_proxy_model_name_or_path={untrained_model_dir}")
    cells = plan_cells(build_train_params(str(config), paths))
    arms = yaml.safe_load(config.read_text())["compare_arms"]
    assert len(cells) == 3 * len(arms) and all(c.params["train"]["max_steps"] > 0 for c in cells)

    code = main(["compare", str(config), "compare_metrc=loss", "--project-dir", str(project_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "compare_metrc" in err[0]


def test_killed_comparison_reruns_only_the_missing_cells(kedro_project, tiny_model_dir, demo_dir, monkeypatch):
    """A comparison that dies in its second cell (half of that cell written) keeps the finished cell; the re-run
    runs the three others only, and the leaderboard has all four."""
    from dataflex.pipelines.compare import cells as lib

    project = kedro_project
    monkeypatch.chdir(project)
    params = _params(project, tiny_model_dir, demo_dir)
    real, ran = lib.run_cell, []

    def dies_in_the_second(cell, *args, **kwargs):
        ran.append(cell.key)
        if len(ran) == 2:
            Path(cell.output_dir).mkdir(parents=True)
            (Path(cell.output_dir) / "train_result.json").write_text("{")  # what a killed cell leaves
            raise RuntimeError("killed")
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(lib, "run_cell", dies_in_the_second)
    with pytest.raises(Exception, match="killed"):
        _run(project, params)
    root = project / "data" / "06_models" / "compare" / "compare"
    keys = ("static/seed-0", "static/seed-1", "random/seed-0", "random/seed-1")
    finished = [k for k in keys if (root / k / "run_summary.json").is_file()]
    assert finished == [ran[0]]
    first = (root / ran[0] / "run_summary.json").stat().st_mtime_ns

    ran.clear()
    monkeypatch.setattr(lib, "run_cell", lambda cell, *a, **kw: ran.append(cell.key) or real(cell, *a, **kw))
    _run(project, params)
    assert len(ran) == 3 and finished[0] not in ran
    assert (root / finished[0] / "run_summary.json").stat().st_mtime_ns == first
    reports = project / "data" / "08_reporting" / "compare"
    cells = list(csv.DictReader(io.StringIO((reports / "cells.csv").read_text())))
    assert len(cells) == 4
