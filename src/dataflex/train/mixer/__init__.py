"""Mixers. Each component module is imported here so its @register_mixer runs (seed page, step two)."""

from .base_mixer import Mixer  # noqa: F401
from .doremi_mixer import DoReMiMixer  # noqa: F401
from .dynamic_moe_mixer import DynamicMoEMixer  # noqa: F401
from .odm_mixer import ODMMixer  # noqa: F401
from .random_mixer import RandomMixer  # noqa: F401
from .static_mixer import StaticMixer  # noqa: F401
