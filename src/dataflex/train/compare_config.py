"""Settings of the `compare` pipeline (`compare` parameter group, flat YAML keys `compare_<key>`): an equal-budget
comparison of named arms over one base configuration, with seeds. The checks here need only the group itself;
those that need the base configuration (unknown component, different base model, a budget an arm cannot meet)
live in `dataflex.pipelines.compare.cells.plan_cells`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from dataflex.core.schema import Schema, setting

METRICS = ("loss", "perplexity", "accuracy")
# Arm names become Kedro namespaces and folder names: no dots, slashes or spaces.
ARM_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_arms(arms: Any) -> str | None:
    """Each arm a mapping with a unique `name` (letters, digits, _ and -)."""
    seen: set[str] = set()
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or "name" not in arm:
            return f"a list of mappings with a name each (arm {i} has none)"
        name = arm["name"]
        if not isinstance(name, str) or not ARM_NAME.match(name):
            return f"named with letters, digits, _ or - only (arm {name!r}: a folder and a Kedro namespace)"
        if name in seen:
            return f"arms with unique names (duplicate arm name {name!r})"
        seen.add(name)
    return None


def check_seeds(seeds: Any) -> str | None:
    """At least one seed, each an integer >= 0, no repeats."""
    if not seeds:
        return "at least one seed"
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        return "integers >= 0"
    if len(set(seeds)) != len(seeds):
        return "seeds without repeats"
    return None


@dataclass(frozen=True)
class CompareConfig(Schema):
    """The `compare` pipeline: arms x seeds at one budget, a leaderboard with error bars and paired differences."""

    group: ClassVar[str] = "compare"
    flat_prefix: ClassVar[str | None] = "compare_"

    arms: list[dict[str, Any]] = setting(
        [],
        "named arms, each {name, pipeline?, overrides}: flat keys (train_type, component_name, less_targets) or "
        "grouped ({dataflex: {...}}) over the run's own config; pipeline: doremi | less | static_select",
        check=check_arms,
    )
    seeds: list[int] = setting([0], "train.seed of each repetition (every arm runs every seed)", check=check_seeds)
    budget_steps: int = setting(0, "optimizer steps of every arm's training run (required, > 0)", ge=0)
    baseline: str | None = setting(None, "the arm the others are compared with (null: the first arm)")
    metric: str = setting("loss", "what the leaderboard ranks by, on the eval sets", choices=METRICS)
    allow_different_base: bool = setting(
        False, "allow arms with different base models or training pools (not comparable: refused by default)"
    )
