"""Selectors. Each component module is imported here so its @register_selector runs (seed page, step two)."""

from .base_selector import Selector  # noqa: F401
from .custom_selector import *  # noqa: F401, F403
from .delta_loss_selector import DeltaLossSelector  # noqa: F401
from .less_selector import LessSelector  # noqa: F401
from .loss_selector import LossSelector  # noqa: F401
from .random_selector import RandomSelector  # noqa: F401
