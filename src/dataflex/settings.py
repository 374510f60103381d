"""Kedro project settings."""

import os

from kedro.config import OmegaConfigLoader

from dataflex.hooks import ProjectHooks

HOOKS = (ProjectHooks(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader


def environment(name: str, default: str | None = None) -> str | None:
    """`${env:NAME, default}` in conf/: the environment's value (used for MLFLOW_TRACKING_URI in mlflow.yml)."""
    return os.environ.get(name, default)


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"env": environment},
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
    },
}
