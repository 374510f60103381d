"""The package logger, importable as the seed page shows: `from dataflex.utils.logging import logger`."""

import logging

logger = logging.getLogger("dataflex")
if not logging.getLogger().handlers and not logger.handlers:
    # Library use without Kedro/CLI logging config: still show INFO lines. The logger keeps propagating, so once
    # Kedro's logging config (conf/logging.yml) replaces this handler, the lines reach Kedro's handlers instead.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

__all__ = ["logger"]
