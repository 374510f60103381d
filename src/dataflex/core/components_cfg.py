"""Components config in DataFlex's format: `selectors: / mixers: / weighters:` -> key -> {name, params}.

It can come from a standalone `components_cfg_file` YAML (as DataFlex uses) or inline from Kedro
parameters (`dataflex.components`); the inline form wins key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dataflex.core.errors import ConfigError
from dataflex.core.registry import SECTIONS
from dataflex.utils.io import read_user_text


def load_components_cfg(path: str | Path | None = None, inline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {section: {} for section in SECTIONS.values()}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"components_cfg_file '{path}' does not exist; point it at a components YAML")
        try:
            loaded = yaml.safe_load(read_user_text(path, "components_cfg_file", ConfigError)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"components_cfg_file '{path}' is not valid YAML: {_one_line(exc)}") from None
        _merge_into(cfg, loaded, str(path))
    if inline:
        _merge_into(cfg, inline, "parameters dataflex.components")
    return cfg


def component_spec(cfg: Mapping[str, Any], kind: str, component_name: str) -> tuple[str, dict[str, Any]]:
    """(registry name, params) for `component_name` of `kind`.

    An entry's `name` field, when present, names the registered class, so one class can appear under
    several keys with different params (DataFlex ignores it); otherwise the key is the name.
    A component that has no entry gets no params (its constructor defaults).
    """
    section = SECTIONS[kind]
    entry = (cfg.get(section) or {}).get(component_name)
    if entry is None:
        return component_name, {}
    return entry.get("name") or component_name, dict(entry.get("params") or {})


def _merge_into(cfg: dict[str, Any], loaded: Any, where: str) -> None:
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(SECTIONS.values())}")
    for section, entries in loaded.items():
        if section not in SECTIONS.values():
            raise ConfigError(f"{where}: unknown section '{section}'; valid: {', '.join(SECTIONS.values())}")
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{where}: '{section}' must map component names to {{name, params}}")
        for key, entry in entries.items():
            entry = entry or {}
            if not isinstance(entry, Mapping) or set(entry) - {"name", "params"}:
                raise ConfigError(f"{where}: {section}.{key} must have only 'name' and 'params'")
            params = entry.get("params") or {}
            if not isinstance(params, Mapping):
                raise ConfigError(f"{where}: {section}.{key}.params must be a mapping")
            cfg[section][key] = {"name": entry.get("name") or key, "params": dict(params)}


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
