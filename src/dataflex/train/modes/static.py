"""`static`: epochs over the pool with the standard loss; the run core's defaults are exactly this mode."""

from __future__ import annotations

from dataflex.train.run import Mode

__all__ = ["StaticMode"]


class StaticMode(Mode):
    name = "static"
