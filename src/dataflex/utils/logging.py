"""The package logger, importable as the seed page shows: `from dataflex.utils.logging import logger`."""

import logging

logger = logging.getLogger("dataflex")
if not logging.getLogger().handlers and not logger.handlers:
    # Library use without Kedro/CLI logging config: still show INFO lines once.
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

__all__ = ["logger"]
