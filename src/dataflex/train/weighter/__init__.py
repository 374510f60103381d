"""Weighters. Each component module is imported here so its @register_weighter runs (seed page, step two)."""

from .adapt_weighter import AdaptWeighter  # noqa: F401
from .base_weighter import StepWeighter, Weighter  # noqa: F401
from .custom_weighter import CustomWeighter  # noqa: F401
from .loss_weighter import LossWeighter  # noqa: F401
