"""Every check across keys or groups, in one place (a key's own type, range and choices live on its field).

Nothing heavy runs here: no model or dataset is loaded; with `check_paths` the model path, the raw dataset rows,
the resume checkpoint and the launch config are read."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from dataflex.config.groups import IMPLEMENTED_TRAIN_TYPES, DataConfig, RunConfig
from dataflex.core.errors import ConfigError
from dataflex.train.less_config import LessConfig, target_list
from dataflex.train.static_select_config import StaticSelectConfig

# Pipelines run by name whose own group is then checked too (`--pipeline less`, `kedro run --pipelines=less`).
PIPELINE_GROUPS = ("less", "static_select")


def validate(run_config: RunConfig, *, check_paths: bool = True, pipelines: Collection[str] = ()) -> None:
    """Every check that needs no heavy work: one ConfigError line for the first problem found.

    `pipelines`: pipelines about to run by name; `less` / `static_select` add their group's checks."""
    rc = run_config
    rc.train.validate()  # also ran on construction; repeated so this stays the one entry point
    train_type = rc.dataflex.train_type
    if train_type not in IMPLEMENTED_TRAIN_TYPES:
        raise ConfigError(
            f"train_type '{train_type}' is recognised but not available in this version yet; "
            f"available: {', '.join(IMPLEMENTED_TRAIN_TYPES)}"
        )
    if not rc.model.model_name_or_path:
        raise ConfigError("model_name_or_path is missing; set it to a local model directory or a hub id")
    if not rc.data.dataset:
        raise ConfigError("dataset is missing; name one or more datasets of dataset_info.json (list or 'a,b,c')")

    from dataflex.data.templates import get_template

    get_template(rc.data.template)
    if rc.train.eval_strategy != "no" and not _has_eval(rc.data):
        raise ConfigError(
            f"eval_strategy: {rc.train.eval_strategy} evaluates the eval sets during training; set eval_dataset or "
            "val_size, or eval_strategy: no"
        )
    if check_paths:
        _check_paths(rc)
        from dataflex.distributed.launch import check_launch_config

        check_launch_config(rc.train.to_dict())
    no_eval = sorted(set(pipelines) & {"less", "static_select", "doremi"})
    if rc.train.eval_strategy != "no" and no_eval:
        raise ConfigError(
            f"eval_strategy: {rc.train.eval_strategy} is not supported in the {no_eval[0]} pipeline (its trainings "
            "do not evaluate during training); set eval_strategy: no, or use a train_type run"
        )
    if "less" in pipelines:
        check_less(rc.less, rc.data.dataset_dir)
    if "static_select" in pipelines:
        check_static_select(rc.static_select, rc.data.dataset_dir)
    if train_type != "static":
        _check_dynamic(rc)  # last: it imports user_modules, whose code should not run for a config refused anyway


def validate_params(
    params: Mapping[str, Any], *, check_paths: bool = True, pipelines: Collection[str] = ()
) -> RunConfig:
    """`validate(RunConfig.from_params(params))`: the grouped-dict entry point of the CLI, the hooks and tests."""
    run_config = RunConfig.from_params(params)
    validate(run_config, check_paths=check_paths, pipelines=pipelines)
    return run_config


def _has_eval(data: DataConfig) -> bool:
    return bool(data.eval_dataset or data.val_size)


def _check_dynamic(rc: RunConfig) -> None:
    """Component name and params, and the schedule, of a dynamic mode (before any model is loaded)."""
    from dataflex.train.modes import KIND_OF_TRAIN_TYPE, component_for

    flex, data = rc.dataflex, rc.data
    if flex.train_type == "dynamic_mix":
        from dataflex.data.dataset_info import parse_dataset_names
        from dataflex.train.modes.mix import check_mix_config
        from dataflex.train.schedule import mix_schedule

        check_mix_config(flex, num_domains=len(parse_dataset_names(data.dataset)))
        if flex.static_mix:
            return
        if flex.update_times >= 1 or flex.train_step > 0 or rc.train.max_steps > 0:
            mix_schedule(flex, rc.train, None)  # else its length depends on the pool: checked when it is known
    kind = KIND_OF_TRAIN_TYPE[flex.train_type]
    name, _ = component_for(flex, kind)
    if kind == "mixer":
        from dataflex.train.modes.mix import check_mixer_model

        check_mixer_model(rc, name)
    if flex.train_type == "dynamic_select":
        from dataflex.train.modes.select import check_select_config

        check_select_config(rc, _has_eval(data))
    if flex.train_step and flex.warmup_step > flex.train_step:
        raise ConfigError(
            f"warmup_step ({flex.warmup_step}) > train_step ({flex.train_step}): the {kind} "
            "would never start; lower warmup_step or raise train_step"
        )
    if name == "adapt" and not _has_eval(data):
        raise ConfigError("weighter 'adapt' needs an eval_dataset (its anchor set); set eval_dataset or val_size")


def _check_paths(rc: RunConfig) -> None:
    from dataflex.data.pools import check_sources
    from dataflex.models.loader import check_lora_target, check_model_path, check_router

    model, data, demo = rc.model, rc.data, rc.demo
    will_build = demo.build_if_missing
    demo_model = _same_path(model.model_name_or_path, demo.model_dir)
    demo_data = _same_path(data.dataset_dir, demo.data_dir)
    if not (will_build and demo_model and not Path(model.model_name_or_path).exists()):
        check_model_path(model.model_name_or_path)
        if model.finetuning_type == "lora" and Path(model.model_name_or_path).is_dir():
            check_lora_target(model.model_name_or_path, model.lora_target)
        if model.freeze_gate and Path(model.model_name_or_path).is_dir():
            check_router(model.model_name_or_path, "freeze_gate")
    if not (will_build and demo_data and not (Path(data.dataset_dir) / "dataset_info.json").exists()):
        check_sources(data, rc.dataflex.mixer_eval_dataset)
    from dataflex.train.trainer.state import read_manifest, resolve_resume_path

    resume = resolve_resume_path(rc.train.resume_from_checkpoint, rc.train.output_dir)
    if resume is not None:
        read_manifest(resume)
    cfg_file = rc.dataflex.components_cfg_file
    if cfg_file:  # read even when this mode builds no component: a broken file is never silently ignored
        from dataflex.core.components_cfg import load_components_cfg

        load_components_cfg(cfg_file, rc.dataflex.components)
    check_output_dir(rc.train.output_dir)


def check_output_dir(output_dir: str) -> None:
    """The output_dir is (or can become) a writable folder: known before training, not after it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {path} is a file, not a folder; choose a folder path")
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path} cannot be created: {existing} is not a writable folder")


def _same_path(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    return Path(a).resolve() == Path(b).resolve()


def _check_targets(group: str, cfg: Mapping[str, Any], dataset_dir: str | None) -> None:
    targets = target_list(cfg)
    if not targets or not all(targets):
        raise ConfigError(f"{group}.targets is empty: name the target task's dev set(s), e.g. targets: [arith_dev]")
    # Each target must be a dataset of dataset_info.json (when the corpus is there to ask).
    if dataset_dir is not None and (Path(dataset_dir) / "dataset_info.json").is_file():
        from dataflex.data.dataset_info import resolve_datasets

        for target in targets:
            resolve_datasets(target, dataset_dir)


def check_less(less: LessConfig, dataset_dir: str | None = None) -> None:
    """The `less` pipeline's checks beyond each key's own: targets named (and known, given the dataset dir)."""
    _check_targets("less", less.to_dict(), dataset_dir)


def check_static_select(cfg: StaticSelectConfig, dataset_dir: str | None = None) -> None:
    """The `static_select` pipeline's checks: a registered selector with valid params, and its targets."""
    import dataflex.train.selector  # noqa: F401  (registers the selectors)
    from dataflex.core.registry import REGISTRY

    REGISTRY.check("selector", cfg.selector, cfg.params)
    _check_targets("static_select", cfg.to_dict(), dataset_dir)
