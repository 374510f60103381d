"""Kedro project settings."""

import os

from dataflex.cli import quiet_known_warnings

# Known third-party deprecation noise out before the imports below (importing the hooks imports mlflow, which warns).
quiet_known_warnings()

from kedro.config import OmegaConfigLoader  # noqa: E402

from dataflex.hooks import ProjectHooks, default_output_dir, mlflow_run_name  # noqa: E402

HOOKS = (ProjectHooks(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader


def environment(name: str, default: str | None = None) -> str | None:
    """`${env:NAME, default}` in conf/: the environment's value (used for MLFLOW_TRACKING_URI in mlflow.yml)."""
    return os.environ.get(name, default)


CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {
        "env": environment,
        # globals.yml: each pipeline's own default output folder (data/06_models/<pipeline>)
        "dataflex_output_dir": default_output_dir,
        # mlflow.yml: the run name says the mode, the component and the targets
        "dataflex_run_name": mlflow_run_name,
    },
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
    },
}
