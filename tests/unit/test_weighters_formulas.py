"""Weighters without a model: formulas on hand-made losses, the `uniform` alias, bad config.
(Training with weighters is in tests/integration/test_weighters.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.train.weighter.loss_weighter import loss_weights

LOSSES = [1.0, 2.0, 3.0, 5.0]


def _reference(strategy: str, delta: float, r: float) -> list[float]:
    """The spec's formulas (dataflex-mix-weight.md 4.3), written out in plain Python."""
    lo, hi = min(LOSSES), max(LOSSES)
    norm = [(2 * delta * x - delta * (hi + lo)) / max(hi - lo, 1e-6) for x in LOSSES]
    f = {
        "linupper": [min(n + delta, delta) for n in norm],
        "linear": norm,
        "quadratic": [1 - n**2 / delta**2 for n in norm],
        "extremes": [abs(n) for n in norm],
    }[strategy]
    e = [math.exp((v - max(f)) / r) for v in f]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("strategy", ["linupper", "linear", "quadratic", "extremes"])
@pytest.mark.parametrize("delta, r", [(1.0, 1.0), (2.0, 0.5)])
def test_loss_weights_match_formulas(strategy, delta, r):
    got = loss_weights(torch.tensor(LOSSES), strategy, delta, r)
    assert got.tolist() == pytest.approx(_reference(strategy, delta, r), rel=1e-6)


def test_uniform_is_an_alias_that_upweights_hard_samples():
    w = REGISTRY.build("weighter", "loss", cfg={"strategy": "uniform"})
    assert w.strategy == "linear"
    weights = loss_weights(torch.tensor(LOSSES), "linear")
    assert weights.argmax() == 3 and float(weights.max() / weights.min()) == pytest.approx(math.e**2, rel=1e-6)


def test_bad_weighter_config():
    with pytest.raises(ConfigError, match="unknown strategy 'hardest'"):
        REGISTRY.build("weighter", "loss", cfg={"strategy": "hardest"})
    with pytest.raises(ConfigError, match="does not accept parameter.*stratgy"):
        REGISTRY.build("weighter", "loss", cfg={"stratgy": "linupper"})
    expected = r"unknown weighter 'lossy' \(did you mean loss\?\); registered weighters: "
    with pytest.raises(ConfigError, match=expected) as err:
        REGISTRY.build("weighter", "lossy")
    listed = str(err.value).split("registered weighters: ")[1].split(" (")[0].split(", ")
    assert {"adapt", "custom", "loss"} <= set(listed)  # (other tests may have registered user weighters)
