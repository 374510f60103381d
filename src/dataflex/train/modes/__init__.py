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

__all__ = ["KIND_OF_TRAIN_TYPE", "component_for", "get_mode"]

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
