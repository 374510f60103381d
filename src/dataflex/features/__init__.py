"""Per-sample features of a model state: gradients (LESS), projections, the gradient datastore, matching.

Works without Kedro: `per_sample_gradient_features(model, dataset, ...)` returns [N, k] features;
`GradientDatastore(root).extract(...)` stores and reuses them; `less_scores` / `top_k` select.
"""

from dataflex.features.datastore import (
    FEATURE_CODE_VERSION,
    FeatureSet,
    FeatureSettings,
    GradientDatastore,
    model_state_fingerprint,
    sample_hashes,
)
from dataflex.features.gradients import per_sample_gradient_features, per_sample_losses
from dataflex.features.matching import (
    aggregate,
    checkpoint_weights,
    influence,
    less_scores,
    streamed_less_scores,
    top_k,
)
from dataflex.features.optimizer_state import AdamMoments, adam_transform, resolve_adam_state
from dataflex.features.projectors import PROJECTORS, Projector

__all__ = [
    "FEATURE_CODE_VERSION",
    "PROJECTORS",
    "AdamMoments",
    "FeatureSet",
    "FeatureSettings",
    "GradientDatastore",
    "Projector",
    "adam_transform",
    "aggregate",
    "checkpoint_weights",
    "influence",
    "less_scores",
    "streamed_less_scores",
    "model_state_fingerprint",
    "per_sample_gradient_features",
    "per_sample_losses",
    "resolve_adam_state",
    "sample_hashes",
    "top_k",
]
