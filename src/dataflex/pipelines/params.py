"""The merged parameters of the current run, for pipelines whose shape depends on them (round counts).

A project hook stashes them when a run starts (with --env and --params). Without a run (kedro viz, kedro
registry, tests) they are read from conf/ (base + local), which cannot see --params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def current_params() -> dict[str, Any] | None:
    from dataflex.hooks import get_params

    params = get_params()
    if params is not None:
        return params
    try:
        from kedro.config import OmegaConfigLoader
        from kedro.framework.project import settings

        conf = Path.cwd() / "conf"
        if not conf.is_dir():
            return None
        return OmegaConfigLoader(conf_source=str(conf), **settings.CONFIG_LOADER_ARGS)["parameters"]
    except Exception:  # no project here: the pipeline falls back to its defaults
        return None


def run_config(parameters: dict[str, Any], train_type: str | None = None) -> Any:
    """The node boundary: Kedro's merged parameters parsed once into the typed RunConfig (a mode's pipeline run
    by name is that train_type)."""
    from dataclasses import replace

    from dataflex.config import RunConfig

    cfg = RunConfig.from_params(parameters)
    return replace(cfg, dataflex=replace(cfg.dataflex, train_type=train_type)) if train_type else cfg


def rounds(pipeline: str) -> int | None:
    """How many rounds to unroll for `pipeline`, from the current parameters and the one schedule module (1 when
    there are no parameters or they are invalid: the run's validation then says why; None when the count depends
    on the pool's size: the pipeline then runs its rounds in one node)."""
    from dataflex.core.errors import DataFlexError
    from dataflex.train.schedule import num_rounds

    params = current_params()
    if params is None:
        return 1
    try:
        return num_rounds(run_config(params, pipeline if pipeline.startswith("dynamic_") else None), pipeline)
    except DataFlexError:
        return 1


def config_inputs() -> list[str]:
    """The `params:<group>` inputs of `resolve_config`: one per config group (kedro-mlflow logs each key under its
    group's name, e.g. `model.lora_rank`)."""
    from dataflex.config.groups import GROUPS

    return [f"params:{group}" for group in GROUPS]


def resolve_config(*groups: dict) -> dict[str, Any]:
    """The run's whole configuration, typed-checked with every default filled in: the `run_config` every node
    reads (in memory), parsed once here at the pipeline's edge."""
    from dataflex.config import RunConfig
    from dataflex.config.groups import GROUPS

    return RunConfig.from_params(dict(zip(GROUPS, groups, strict=True))).to_params()
