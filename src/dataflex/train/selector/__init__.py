"""Selectors. Each component module is imported here so its @register_selector runs (seed page, step two)."""

from .base_selector import Selector  # noqa: F401
