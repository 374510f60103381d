"""DataFlex's schedule arithmetic, in one place: when components act, how many rounds a run has, how long it is.

Used by the modes (which segment to train next) and by the pipeline builders (how many `round_<k>` namespaces
to unroll), so the two can never disagree. G = per-device batch × accumulation × processes (the global batch).

Selection (`dynamic_select`): a flex epoch has E = w + u·T optimizer steps (T = update_times ≥ 1), or
ceil(N/G) when T ≤ 0 and no train_step, or is unbounded when T ≤ 0 and train_step > 0. The run has train_step
steps, else ceil(num_train_epochs · E). Each flex epoch starts with warm-up data drawn by the selector; at
r = w, w+u, ... (r = step within the flex epoch) it selects G × (steps to the next event) samples.

Mixing (`dynamic_mix`): with update_times ≥ 1 the run has w + u·T steps; with update_times ≤ 0 it has
train_step (or the epoch-derived count) and the mixer acts every u steps after w. A static mix (or a mixer that
acts inside the loop only, the DoReMi proxy) is one segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dataflex.core.errors import ConfigError

__all__ = ["Event", "MixSchedule", "SelectSchedule", "global_batch", "mix_schedule", "num_rounds", "select_schedule"]


def global_batch(train: Any) -> int:
    return int(train.per_device_train_batch_size) * int(train.gradient_accumulation_steps) * int(train.num_processes)


@dataclass(frozen=True)
class Event:
    step: int
    kind: str  # "warmup" | "select"
    flex_epoch: int
    end: int  # the next event's step, or the end of the run
    current: int = 0  # 1-based selection number within the flex epoch
    update_times: int = 0  # selections per flex epoch, as passed to selectors


@dataclass(frozen=True)
class SelectSchedule:
    global_batch: int
    epoch_steps: int | None
    max_steps: int
    events: list[Event]

    @property
    def selections(self) -> list[Event]:
        return [e for e in self.events if e.kind == "select"]

    @property
    def num_rounds(self) -> int:
        return 1 + len(self.selections)

    def round_range(self, k: int) -> tuple[int, int]:
        sel = self.selections
        start = 0 if k == 0 else sel[k - 1].step
        end = sel[k].step if k < len(sel) else self.max_steps
        return start, end


def select_schedule(flex: Any, train: Any, pool_size: int | None) -> SelectSchedule:
    """The selection schedule of `flex` (DynamicConfig) and `train` (TrainingArguments); see the module doc."""
    w, u, t, s = flex.warmup_step, flex.update_step, flex.update_times, flex.train_step
    if w < 1 or u < 1:
        raise ConfigError(f"dynamic_select needs warmup_step >= 1 and update_step >= 1, got {w} and {u}")
    g = global_batch(train)
    if t > 0:
        epoch: int | None = max(1, w + u * t)
    elif s <= 0:
        if pool_size is None:
            raise ConfigError(
                "with update_times <= 0 and no train_step the flex epoch is the pool size; "
                "set update_times >= 1 or train_step > 0 to know the rounds before the data"
            )
        epoch = max(1, math.ceil(pool_size / g))
    else:
        epoch = None
    max_steps = s if s > 0 else max(1, math.ceil(float(train.num_train_epochs) * epoch))
    marks: list[tuple[int, str, int, int, int]] = [(0, "warmup", 0, 0, 0)]
    for step in range(1, max_steps):
        r = step % epoch if epoch else step
        fe = step // epoch if epoch else 0
        if epoch and r == 0:
            marks.append((step, "warmup", fe, 0, 0))
        elif r == w or (r > w and (r - w) % u == 0):
            total = t if t > 0 else (max(1, math.ceil(max(epoch - w, 0) / u)) if epoch else t)
            marks.append((step, "select", fe, (r - w) // u + 1, total))
    events = [
        Event(st, kind, fe, marks[i + 1][0] if i + 1 < len(marks) else max_steps, c, total)
        for i, (st, kind, fe, c, total) in enumerate(marks)
    ]
    return SelectSchedule(g, epoch, max_steps, events)


@dataclass(frozen=True)
class MixSchedule:
    max_steps: int
    boundaries: list[int]  # end step of each round; round 0 ends at warmup_step (or max_steps when one segment)

    @property
    def num_rounds(self) -> int:
        return len(self.boundaries)

    def start(self, round_k: int) -> int:
        return 0 if round_k == 0 else self.boundaries[round_k - 1]


def mix_schedule(flex: Any, train: Any, pool_size: int | None, *, single_segment: bool = False) -> MixSchedule:
    """The mixing schedule; `single_segment`: a static mix or the DoReMi proxy (one segment, no mixer calls)."""
    if train.max_steps > 0:
        default_steps = train.max_steps
    elif pool_size is None:
        default_steps = None
    else:
        default_steps = max(1, int(math.floor(pool_size / global_batch(train)) * train.num_train_epochs))
    if single_segment or flex.static_mix:
        total = flex.train_step if flex.train_step > 0 else default_steps
        if total is None:
            raise ConfigError("the run length depends on the pool size; set max_steps or train_step")
        return MixSchedule(total, [total])
    w, u, t = flex.warmup_step, flex.update_step, flex.update_times
    if w < 1 or u < 1:
        raise ConfigError(f"dynamic_mix needs warmup_step >= 1 and update_step >= 1, got {w} and {u}")
    if t >= 1:
        total = w + u * t
    else:
        total = flex.train_step if flex.train_step > 0 else default_steps
        if total is None:
            raise ConfigError(
                "with update_times <= 0 the number of mixer updates depends on the pool size; "
                "set train_step > 0 or update_times >= 1 to know the rounds before the data"
            )
    if total <= w:
        raise ConfigError(f"the run has {total} steps, not more than warmup_step={w}: the mixer would never act")
    boundaries = [w]
    while boundaries[-1] < total:
        boundaries.append(min(boundaries[-1] + u, total))
    return MixSchedule(total, boundaries)


def num_rounds(cfg: Any, pipeline: str) -> int | None:
    """Rounds to unroll for `pipeline` before the data is read: None when they depend on the pool's size
    (`update_times <= 0` bounded by epochs, DataFlex's "update until the run ends"), 1 when the config cannot
    say (validation will)."""
    if pipeline == "less":
        return int(cfg.less.warmup_epochs)
    if pipeline not in ("dynamic_select", "dynamic_mix"):
        return 1
    flex = cfg.dataflex
    if pipeline == "dynamic_mix" and flex.static_mix:
        return 1
    bounded = flex.train_step > 0 or (pipeline == "dynamic_mix" and cfg.train.max_steps > 0)
    if flex.update_times <= 0 and not bounded:
        return None
    try:
        if pipeline == "dynamic_select":
            return select_schedule(flex, cfg.train, None).num_rounds
        return mix_schedule(flex, cfg.train, None).num_rounds
    except ConfigError:
        return 1
