"""Selectors. Each component module is imported here so its @register_selector runs (seed page, step two)."""

from .base_selector import Selector  # noqa: F401
from .cluster_less_selector import ClusterLessSelector  # noqa: F401
from .custom_selector import *  # noqa: F401, F403
from .delta_loss_selector import DeltaLossSelector  # noqa: F401
from .less_selector import LessSelector  # noqa: F401
from .loss_selector import LossSelector  # noqa: F401
from .near_selector import NearSelector  # noqa: F401
from .nice_selector import NiceSelector  # noqa: F401
from .random_selector import RandomSelector  # noqa: F401
from .tsds_selector import TsdsSelector  # noqa: F401
