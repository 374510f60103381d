"""Modes: what each kind of run adds to the one run core (`dataflex.train.run`).

Each mode is a `Mode` (components, data plan, loss strategy) plus the library functions its Kedro pipeline calls
between segments: `static` and `weight` train in one segment; `select` and `mix` in rounds with the selector /
mixer acting between them; `less` and `static_select` select once from gradient or embedding features, then train
afresh on the selection.
"""

from __future__ import annotations

from typing import Any

from dataflex.core.components_cfg import component_spec, load_components_cfg
from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY, import_user_modules

__all__ = ["KIND_OF_TRAIN_TYPE", "component_for", "component_record", "get_mode"]

KIND_OF_TRAIN_TYPE = {"dynamic_select": "selector", "dynamic_mix": "mixer", "dynamic_weight": "weighter"}


def component_for(flex: Any, kind: str) -> tuple[str, dict[str, Any]]:
    """(registered name, params) of the configured component of `kind`; config errors before any model is loaded.
    Params are checked against the component's constructor signature (the one home of its defaults)."""
    name = flex.component_name
    if not name:
        raise ConfigError(f"train_type {flex.train_type} needs component_name (a registered {kind})")
    import_user_modules(flex.user_modules)
    cfg = load_components_cfg(flex.components_cfg_file, flex.components)
    registered, params = component_spec(cfg, kind, name)
    REGISTRY.check(kind, registered, params)
    return registered, params


# What the run passes to a component (never a user setting): left out of the record of its parameters.
RUNTIME_OBJECTS = {
    "dataset",
    "eval_dataset",
    "accelerator",
    "data_collator",
    "mixture_manager",
    "mixer_eval_dataset",
    "output_dir",
}


def component_record(flex: Any, kind: str) -> dict[str, Any]:
    """The component a run used and every parameter it received (the components file's values over the
    constructor's defaults), for the run summary: what a run used is recorded, not inferred from files."""
    import inspect
    import json

    name, params = component_for(flex, kind)
    cls = REGISTRY.get(kind, name)
    defaults = {
        p.name: p.default
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.default is not p.empty and p.name not in RUNTIME_OBJECTS
    }
    effective = {**defaults, **params}
    try:
        json.dumps(effective)
    except TypeError:  # a default that is not JSON (a tuple of objects, ...): its repr
        effective = {
            k: v if isinstance(v, str | int | float | bool | list | dict | None) else repr(v)
            for k, v in effective.items()
        }
    return {"kind": kind, "key": flex.component_name, "name": name, "params": effective}


def get_mode(name: str) -> type:
    """The Mode class of a train_type / pipeline name."""
    from dataflex.train.modes.mix import MixMode
    from dataflex.train.modes.select import SelectMode
    from dataflex.train.modes.static import StaticMode
    from dataflex.train.modes.weight import WeightMode

    modes = {m.name: m for m in (StaticMode, WeightMode, SelectMode, MixMode)}
    if name not in modes:
        raise ConfigError(f"unknown mode '{name}'; valid: {', '.join(modes)}")
    return modes[name]
