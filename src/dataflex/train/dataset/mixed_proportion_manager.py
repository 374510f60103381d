"""Domain proportions and deterministic mixed sampling (the seed page's `mixture_manager`).

Sampling is sample-based: an optimizer step of n samples takes n_i samples from domain i, with the
counts apportioned from the current proportions by largest remainder, carrying each domain's rounding
error to the next step (ties broken by a seeded draw). Over any run the counts stay within one sample of
n x steps x p, and no domain systematically absorbs the rounding (DataFlex gave it all to the last domain). Within a
domain rows are drawn without replacement, epoch by epoch, each epoch a fresh permutation seeded by
(seed, domain, epoch); the step's rows are then shuffled together, so batches are mixtures. Everything
is a function of the seed and the per-domain draw counts, so the state is a few integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataflex.core.errors import ConfigError

RULES = ("mixture", "stratified", "uniform")


def check_proportions(p: Any, k: int, what: str = "proportions") -> np.ndarray:
    """Validate and normalise: length k, finite, >= 0, positive sum."""
    arr = np.asarray(p, dtype=np.float64).reshape(-1)
    if arr.size != k:
        raise ConfigError(f"{what} has {arr.size} value(s) but there are {k} domains; give one per dataset")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ConfigError(f"{what} must be finite and >= 0, got {arr.tolist()}")
    if arr.sum() <= 0:
        raise ConfigError(f"{what} sum to zero; give at least one positive value")
    return arr / arr.sum()


def apportion(n: int, p: np.ndarray, rng: np.random.Generator, carry: np.ndarray | None = None) -> np.ndarray:
    """Non-negative integer counts summing to n, closest to n * p + carry (largest remainder, seeded tie-break).
    `carry` (updated in place) holds what earlier steps over- or under-drew, so rounding does not accumulate."""
    exact = n * p + (carry if carry is not None else 0.0)
    counts = np.maximum(np.floor(exact), 0).astype(np.int64)
    short = n - int(counts.sum())
    frac = exact - counts
    tie = rng.random(len(p))
    if short > 0:
        order = np.lexsort((tie, -frac))  # largest fraction first, random among equals
        counts[order[:short]] += 1
    elif short < 0:
        order = [i for i in np.lexsort((tie, frac)) if counts[i] > 0]  # smallest fraction first
        for i in order[:-short]:
            counts[i] -= 1
    if carry is not None:
        carry[:] = exact - counts
    return counts


class MixedProportionManager:
    def __init__(
        self,
        names: Sequence[str],
        sizes: Sequence[int],
        *,
        rule: str = "mixture",
        init_proportions: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        if rule not in RULES:
            raise ConfigError(f"mixture_sample_rule '{rule}' is not valid; use one of {', '.join(RULES)}")
        self.names = list(names)
        self.sizes = [int(s) for s in sizes]
        empty = [n for n, s in zip(self.names, self.sizes) if s < 1]
        if empty:
            raise ConfigError(f"domain(s) {', '.join(empty)} have no samples; remove them from dataset")
        self.rule = rule
        self.seed = seed
        k = len(self.names)
        if rule == "stratified":
            self.proportions = np.asarray(self.sizes, dtype=np.float64) / sum(self.sizes)
        elif rule == "uniform" or init_proportions is None:
            self.proportions = np.full(k, 1.0 / k)
        else:
            self.proportions = check_proportions(init_proportions, k, "init_mixture_proportions")
        self.drawn = [0] * k  # rows drawn so far per domain
        self.carry = np.zeros(k)  # rounding carried between steps
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def fixed(self) -> bool:
        """`stratified` and `uniform` fix the proportions: a dynamic mixer cannot change them."""
        return self.rule != "mixture"

    def set_proportions(self, p: Any) -> np.ndarray:
        if self.fixed:
            raise ConfigError(f"mixture_sample_rule '{self.rule}' fixes the proportions; use 'mixture' with a mixer")
        # The carry is kept: it is "drawn so far minus the target so far" whatever proportions were in force.
        self.proportions = check_proportions(p, len(self.names))
        return self.proportions

    def _row(self, domain: int, k: int) -> int:
        epoch, pos = divmod(k, self.sizes[domain])
        key = (domain, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, domain, epoch])
            self._perms[key] = rng.permutation(self.sizes[domain])
        return int(self._perms[key][pos])

    def draw(self, n: int, step: int) -> list[tuple[int, int]]:
        """n (domain, row) pairs for optimizer step `step` from the current proportions; advances the state."""
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        counts = apportion(n, self.proportions, rng, self.carry)
        pairs = []
        for d, c in enumerate(counts.tolist()):
            pairs.extend((d, self._row(d, self.drawn[d] + j)) for j in range(c))
            self.drawn[d] += c
        order = rng.permutation(len(pairs))
        return [pairs[i] for i in order]

    def state_dict(self) -> dict[str, Any]:
        return {
            "proportions": self.proportions.tolist(),
            "drawn": list(self.drawn),
            "carry": self.carry.tolist(),
            "rule": self.rule,
            "seed": self.seed,
            "names": self.names,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names or state["seed"] != self.seed or state["rule"] != self.rule:
            from dataflex.core.errors import CheckpointError

            raise CheckpointError(
                "checkpoint was trained with other domains, seed or mixture rule; resume with the same"
            )
        self.proportions = np.asarray(state["proportions"], dtype=np.float64)
        self.drawn = [int(x) for x in state["drawn"]]
        self.carry = np.asarray(state["carry"], dtype=np.float64)
