"""Domain proportions and deterministic mixed sampling (the seed page's `mixture_manager`).

Sampling is sample-based: an optimizer step of n samples takes n_i samples from domain i, with the
counts apportioned from the current proportions by largest remainder, carrying each domain's rounding
error to the next step (ties broken by a seeded draw). Over any run the counts stay within one sample of
n x steps x p, and no domain systematically absorbs the rounding (DataFlex gave it all to the last domain). Within a
domain rows are drawn without replacement, epoch by epoch, each epoch a fresh permutation seeded by
(seed, domain, epoch); the step's rows are then shuffled together, so batches are mixtures. Everything
is a function of the seed and the per-domain draw counts, so the state is a few integers.

DataFlex's interface is here too: `names`, `k`, `sources` (name -> that domain's rows), `sizes` (name -> row
count), `probs` (the current proportions; assigning it sets them), `sample_rule`, `initial_proportions`,
`set_proportions()` and `rebuild()`, which returns a `MixedSnapshot`. DataFlex rebuilt the training set from the
proportions after each mix; here the sampler draws every step from the current proportions, so `rebuild()` only
returns a snapshot to inspect. `snapshot()` is the rows drawn since `start_window()` (the data of the window that
just ended: what DataFlex passed to `mix()` as `dataset`).

`hold_out()` removes rows from training before the first draw (a mixer's eval sample split off the pool, as
DataFlex's dynamic_moe does): `sources` and `sizes` then hold the training rows only, and `draw()` still returns
rows of the domain as the pool has it. `mixer_eval_datasets` (DataFlex's name) is domain name -> the held-out
per-domain set of `mixer_eval_dataset`, or None.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset as TorchDataset

from dataflex.core.errors import CheckpointError, ConfigError

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


class MixedSnapshot(TorchDataset):
    """DataFlex's `_MixedSnapshot`: rows of several domains as one dataset; item i is `sources[name][row]` of
    `index_table[i] = (domain, row)`, with its `domain_id`."""

    def __init__(
        self, names: Sequence[str], sources: Mapping[str, Any] | None, index_table: Sequence[tuple[int, int]]
    ) -> None:
        self.names = list(names)
        self.sources = sources
        self.index_table = [(int(d), int(r)) for d, r in index_table]

    def __len__(self) -> int:
        return len(self.index_table)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if self.sources is None:
            raise ConfigError("this mixture manager was built without source datasets; give it sources=")
        d, row = self.index_table[idx]
        return {**self.sources[self.names[d]][row], "domain_id": d}


class MixedProportionManager:
    def __init__(
        self,
        names: Sequence[str],
        sizes: Sequence[int] | Mapping[str, int],
        *,
        rule: str = "mixture",
        init_proportions: Sequence[float] | None = None,
        seed: int = 0,
        sources: Mapping[str, Any] | None = None,
    ) -> None:
        if rule not in RULES:
            raise ConfigError(f"mixture_sample_rule '{rule}' is not valid; use one of {', '.join(RULES)}")
        self.names = list(names)
        counts = [sizes[n] for n in self.names] if isinstance(sizes, Mapping) else list(sizes)
        self._counts = [int(s) for s in counts]  # by domain index, what the sampler uses
        if len(self._counts) != len(self.names):
            raise ConfigError(f"{len(self.names)} domain names but {len(self._counts)} sizes")
        empty = [n for n, s in zip(self.names, self._counts) if s < 1]
        if empty:
            raise ConfigError(f"domain(s) {', '.join(empty)} have no samples; remove them from dataset")
        if sources is not None and [len(sources[n]) for n in self.names] != self._counts:
            raise ConfigError("the source datasets' lengths differ from the domain sizes")
        self.sources = dict(sources) if sources is not None else None
        self.rule = rule
        self.seed = seed
        k = len(self.names)
        self.initial_proportions = (
            check_proportions(init_proportions, k, "init_mixture_proportions") if init_proportions is not None else None
        )
        if rule == "stratified":
            self.proportions = np.asarray(self._counts, dtype=np.float64) / sum(self._counts)
        elif rule == "uniform" or self.initial_proportions is None:
            self.proportions = np.full(k, 1.0 / k)
        else:
            self.proportions = self.initial_proportions.copy()
        self.drawn = [0] * k  # rows drawn so far per domain
        self.carry = np.zeros(k)  # rounding carried between steps
        self.window_start = [0] * k  # `drawn` when the current window began (see `snapshot`)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._kept: dict[int, np.ndarray] = {}  # domain -> its training rows (pool order) after `hold_out`
        self.held_out: dict[str, list[int]] = {}
        self.mixer_eval_datasets: dict[str, Any] | None = None

    # -- DataFlex's names ------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> dict[str, int]:
        """Rows per domain, by name (DataFlex's `sizes`)."""
        return dict(zip(self.names, self._counts))

    @property
    def num_rows(self) -> int:
        return sum(self._counts)

    @property
    def sample_rule(self) -> str:
        return self.rule

    @property
    def probs(self) -> np.ndarray:
        """The current proportions (DataFlex's name); assigning sets them, as `set_proportions` does."""
        return self.proportions

    @probs.setter
    def probs(self, p: Any) -> None:
        self.set_proportions(p)

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

    def rebuild(self, num_samples: int | None = None, seed: int | None = None) -> MixedSnapshot:
        """`num_samples` rows (default: the pool's size) apportioned at the current proportions, drawn with a
        generator seeded by `seed` (default: the manager's). The training sampler is not advanced: it already
        follows the current proportions at every step."""
        n = self.num_rows if num_samples is None else int(num_samples)
        rng = np.random.default_rng([self.seed if seed is None else int(seed), 2_000_003, n])
        counts = apportion(n, self.proportions, rng)
        table = []
        for d, c in enumerate(counts.tolist()):
            size = self._counts[d]
            rows = rng.permutation(size)[:c] if c <= size else rng.integers(0, size, c)
            table.extend((d, int(r)) for r in rows)
        return MixedSnapshot(self.names, self.sources, [table[i] for i in rng.permutation(len(table))])

    def hold_out(self, rows: Mapping[str, Sequence[int]]) -> None:
        """Take `rows` (domain name -> row numbers within that domain) out of training, before any draw. The
        sampler then draws each domain's remaining rows only; `sources` / `sizes` become the training rows."""
        if any(self.drawn):
            raise RuntimeError("hold_out must come before the first draw (it changes what every step samples)")
        for name, taken in rows.items():
            d = self.names.index(name)
            if d in self._kept:
                raise RuntimeError(f"domain '{name}' already has rows held out")
            taken = sorted({int(r) for r in taken})
            size = self._counts[d]
            if taken and not 0 <= taken[0] <= taken[-1] < size:
                raise ValueError(f"held-out rows of domain '{name}' must be in [0, {size})")
            keep = np.setdiff1d(np.arange(size), np.asarray(taken, dtype=np.int64))
            if keep.size < 1:
                raise ConfigError(f"domain '{name}' has {size} rows: holding out {len(taken)} leaves none to train on")
            self._kept[d] = keep
            self._counts[d] = int(keep.size)
            self.held_out[name] = taken
            if self.sources is not None:
                self.sources[name] = self.sources[name].select(keep.tolist())
        self._perms.clear()

    def _held_out_digest(self) -> str:
        """What was held out, in a few characters (checkpoints must be resumed with the same split)."""
        if not self.held_out:
            return ""
        return hashlib.sha256(json.dumps(self.held_out, sort_keys=True).encode()).hexdigest()[:16]

    def pool_row(self, domain: int, row: int) -> int:
        """Training row `row` of `domain` as a row of the domain in the pool (they differ after `hold_out`)."""
        kept = self._kept.get(domain)
        return int(kept[row]) if kept is not None else row

    def start_window(self) -> None:
        """Begin a new window here (a mixing round starts): `snapshot()` covers the draws from now on."""
        self.window_start = list(self.drawn)

    def snapshot(self) -> MixedSnapshot:
        """The rows drawn since `start_window()`, shuffled: the data of the window that just ended."""
        table = [(d, self._row(d, j)) for d in range(self.k) for j in range(self.window_start[d], self.drawn[d])]
        order = np.random.default_rng([self.seed, 3_000_017, *self.drawn]).permutation(len(table))
        return MixedSnapshot(self.names, self.sources, [table[i] for i in order])

    # -- sampling --------------------------------------------------------------------------------------

    def _row(self, domain: int, k: int) -> int:
        epoch, pos = divmod(k, self._counts[domain])
        key = (domain, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self._counts):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, domain, epoch])
            self._perms[key] = rng.permutation(self._counts[domain])
        return int(self._perms[key][pos])

    def draw(self, n: int, step: int) -> list[tuple[int, int]]:
        """n (domain, row) pairs for optimizer step `step` from the current proportions; advances the state."""
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        counts = apportion(n, self.proportions, rng, self.carry)
        pairs = []
        for d, c in enumerate(counts.tolist()):
            pairs.extend((d, self.pool_row(d, self._row(d, self.drawn[d] + j))) for j in range(c))
            self.drawn[d] += c
        order = rng.permutation(len(pairs))
        return [pairs[i] for i in order]

    def state_dict(self) -> dict[str, Any]:
        return {
            "proportions": self.proportions.tolist(),
            "drawn": list(self.drawn),
            "carry": self.carry.tolist(),
            "window_start": list(self.window_start),
            "rule": self.rule,
            "seed": self.seed,
            "names": self.names,
            "held_out": self._held_out_digest(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names or state["seed"] != self.seed or state["rule"] != self.rule:
            raise CheckpointError(
                "checkpoint was trained with other domains, seed or mixture rule; resume with the same"
            )
        if state.get("held_out", "") != self._held_out_digest():
            raise CheckpointError(
                "checkpoint held other rows out of training (a mixer's eval split: eval_samples or "
                "mixer_eval_dataset changed); resume with the same settings"
            )
        self.proportions = np.asarray(state["proportions"], dtype=np.float64)
        self.drawn = [int(x) for x in state["drawn"]]
        self.carry = np.asarray(state["carry"], dtype=np.float64)
        # Checkpoints written before windows existed: the window is the whole run so far.
        self.window_start = [int(x) for x in state.get("window_start", [0] * len(self.names))]
