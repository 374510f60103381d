"""Project hooks: stash the merged parameters (for pipelines whose shape depends on them) and validate
them before any node runs, so a config mistake is one clear line, not a failure an hour in."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from dataflex.config import validate_params
from dataflex.core.errors import DataFlexError
from dataflex.utils.logging import logger

_PARAMS: dict[str, Any] | None = None


def get_params() -> dict[str, Any] | None:
    """The merged parameters of the current run (with --env / --params), if a run has started."""
    return _PARAMS


class ProjectHooks:
    @hook_impl
    def after_context_created(self, context: Any) -> None:
        global _PARAMS
        _PARAMS = dict(context.config_loader["parameters"])
        try:
            validate_params(_PARAMS)
        except DataFlexError as exc:
            logger.error("%s", exc)
            # SystemExit with a message: kedro's CLI exits non-zero with this one line, no traceback.
            raise SystemExit(f"error: {exc}") from None
