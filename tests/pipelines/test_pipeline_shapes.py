"""Kedro pipeline shapes: node names, namespaces and round counts from parameters (no training, milliseconds)."""

from __future__ import annotations

from dataflex.config import RunConfig
from dataflex.train.schedule import num_rounds


def rounds_from_params(params, pipeline):
    return num_rounds(RunConfig.from_params(params), pipeline)


def test_dynamic_mix_pipeline_shape():
    from dataflex.pipelines.dynamic_mix.pipeline import create_pipeline

    names = {n.name for n in create_pipeline(n_rounds=3).nodes}
    assert {
        "dynamic_mix.round_0.train_segment",
        "dynamic_mix.round_1.compute_mixture",
        "dynamic_mix.round_2.train_segment",
        "dynamic_mix.finalize",
    } <= names
    assert "dynamic_mix.round_3.compute_mixture" not in names
    flex = {"warmup_step": 5, "update_step": 10, "update_times": 0, "train_step": 31}
    assert rounds_from_params({"dataflex": flex}, "dynamic_mix") == 4  # 5 | 15 | 25 | 31
    assert rounds_from_params({"dataflex": {**flex, "update_times": 2}}, "dynamic_mix") == 3
    assert rounds_from_params({"dataflex": {"static_mix": True}}, "dynamic_mix") == 1
    # update_times <= 0 with max_steps: the same schedule the mode trains with (no second derivation)
    assert rounds_from_params({"dataflex": {**flex, "train_step": 0}, "train": {"max_steps": 25}}, "dynamic_mix") == 3


def test_less_pipeline_shape():
    from dataflex.pipelines.less.pipeline import create_pipeline

    pipe = create_pipeline(n_checkpoints=3)
    names = {n.name for n in pipe.nodes}
    assert {
        "less.warmup",
        "less.ckpt_0.train_features",
        "less.ckpt_2.target_features",
        "less.select",
        "less.final_train",
        "evaluate",
        "report",
    } <= names
    assert "less.ckpt_3.train_features" not in names
    assert {n.namespace for n in pipe.nodes if "ckpt_1" in n.name} == {"less.ckpt_1"}
    select = next(n for n in pipe.nodes if n.name == "less.select")
    expected = [f"less.ckpt_{k}.{kind}_features" for kind in ("train", "target") for k in range(3)]
    assert [i for i in select.inputs if "ckpt" in i] == expected
    assert rounds_from_params({"less": {"warmup_epochs": 2}}, "less") == 2 and rounds_from_params({}, "less") == 4


def test_dynamic_select_pipeline_shape():
    from dataflex.pipelines.dynamic_select.pipeline import create_pipeline

    names = {n.name for n in create_pipeline(n_rounds=3).nodes}
    assert {
        "dynamic_select.round_0.train_segment",
        "dynamic_select.round_1.select",
        "dynamic_select.round_2.select",
        "dynamic_select.round_2.train_segment",
        "dynamic_select.finalize",
    } <= names
    assert "dynamic_select.round_3.select" not in names
    train = {"per_device_train_batch_size": 4, "num_train_epochs": 2.0}
    flex = {"warmup_step": 2, "update_step": 3, "update_times": 2, "train_step": 0}
    assert rounds_from_params({"dataflex": flex, "train": train}, "dynamic_select") == 1 + 4  # 2 flex epochs x 2
    params = {"dataflex": {**flex, "update_times": 0, "train_step": 11}, "train": train}
    assert rounds_from_params(params, "dynamic_select") == 4
    params = {"dataflex": {**flex, "update_times": 0}, "train": train}
    assert rounds_from_params(params, "dynamic_select") is None  # the flex epoch is the pool: known with the data


def test_pipeline_builders_take_their_round_count_from_the_schedule(monkeypatch):
    """`kedro run` unrolls as many rounds as the mode will train (one schedule module for both)."""
    import dataflex.hooks
    from dataflex.pipelines.dynamic_mix.pipeline import create_pipeline as mix_pipeline
    from dataflex.pipelines.dynamic_select.pipeline import create_pipeline as select_pipeline

    flex = {"warmup_step": 2, "update_step": 3, "update_times": 2, "train_step": 0}
    monkeypatch.setattr(dataflex.hooks, "_PARAMS", {"dataflex": flex, "train": {"per_device_train_batch_size": 4}})
    assert "dynamic_select.round_2.train_segment" in {n.name for n in select_pipeline().nodes}
    assert "dynamic_mix.round_2.train_segment" in {n.name for n in mix_pipeline().nodes}
    assert "dynamic_mix.round_3.train_segment" not in {n.name for n in mix_pipeline().nodes}


def test_the_catalog_owns_every_artefact_under_the_runs_output_dir(project_root, tmp_path):
    """Train states, selections, mixtures and results are catalog datasets of the dataflex.io types, and a run's
    output_dir moves all of them (what kedro-viz shows as the pipelines' datasets)."""
    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import configure_project, pipelines
    from kedro.io import DataCatalog

    from dataflex.io import JSONLinesDataset, SelectionDataset, TrainedModelDataset, TrainStateDataset

    configure_project("dataflex")
    out = tmp_path / "run"
    from dataflex.settings import CONFIG_LOADER_ARGS  # conf/ uses the project's resolvers

    loader = OmegaConfigLoader(
        conf_source=str(project_root / "conf"), runtime_params={"train": {"output_dir": str(out)}}, **CONFIG_LOADER_ARGS
    )
    catalog = DataCatalog.from_config(loader["catalog"])
    kinds = {
        "dynamic_select.round_1.state": TrainStateDataset,
        "dynamic_mix.round_2.state": TrainStateDataset,
        "mixture_history": JSONLinesDataset,
        "trained_model": TrainedModelDataset,
    }
    for name, kind in kinds.items():
        assert isinstance(catalog.get(name), kind), name
    # a report is saved by its own dataset and copied to MLflow
    assert isinstance(catalog.get("less.selection")._dataset, SelectionDataset)
    assert isinstance(catalog.get("static_select.selection")._dataset, SelectionDataset)
    for pipeline in ("static", "dynamic_select", "dynamic_mix", "dynamic_weight", "doremi", "less", "static_select"):
        produced = pipelines[pipeline].outputs() | {o for n in pipelines[pipeline].nodes for o in n.outputs}
        for name in produced:
            if name.endswith(("_plot", "_histogram", "curve", "table", "eval_metrics", "train_pool_stats")):
                continue  # reports: data/08_reporting and MLflow
            if name in ("train_pool", "eval_sets", "raw_inputs", "run_config") or name.endswith("target_sets"):
                continue  # shared inputs; run_config is in memory (parsed once per run)
            described = str(catalog.get(name)._describe())
            assert str(out) in described, f"{pipeline}: {name} is not under the run's output_dir: {described}"


def test_update_until_the_run_ends_runs_all_rounds_in_one_node(monkeypatch):
    """`update_times <= 0` bounded only by the epochs (DataFlex's ODM example): the round count depends on the
    pool's size, so the pipeline runs its rounds in one node instead of unrolling a guess."""
    import dataflex.pipelines.params as params_mod
    from dataflex.pipelines.dynamic_mix.pipeline import create_pipeline as mix_pipeline
    from dataflex.pipelines.dynamic_select.pipeline import create_pipeline as select_pipeline

    flex = {"warmup_step": 2, "update_step": 2, "update_times": -1, "train_step": 0}
    assert rounds_from_params({"dataflex": flex}, "dynamic_mix") is None
    assert rounds_from_params({"dataflex": flex}, "dynamic_select") is None
    monkeypatch.setattr(params_mod, "current_params", lambda: {"dataflex": flex})
    for create, mode in ((mix_pipeline, "dynamic_mix"), (select_pipeline, "dynamic_select")):
        names = {n.name for n in create().nodes}
        assert f"{mode}.all_rounds" in names and not any("round_" in n for n in names), names
