"""Weighters. Each component module is imported here so its @register_weighter runs (seed page, step two)."""

from .base_weighter import Weighter  # noqa: F401
