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
