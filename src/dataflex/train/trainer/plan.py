"""Data plans: which pool indices each optimizer step trains on.

A plan is random access by step (`step_batches(step)`), so resuming is recomputing, not replaying:
the plan for step g depends only on the seed and g. Select and mix plans (later modes) implement the
same interface. Plans are global: with several processes their `grad_accum` is A x processes, and
`shard_step` gives each process its share, so every process trains on the same plan.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch


class DataPlan(Protocol):
    num_steps: int

    def step_batches(self, step: int) -> list[list[int]]:
        """Micro-batches (lists of pool indices) of optimizer step `step` (0-based)."""

    def epoch_at(self, step: int) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def shard_step(micro: list[list[int]], batch_size: int, num_processes: int, rank: int) -> list[list[int]]:
    """Process `rank`'s micro-batches of one optimizer step, from the step's global micro-batches.

    Plans describe the global step (G = B x A x processes samples); each process takes a contiguous,
    near-equal share (sizes differ by at most one) in micro-batches of at most B. A full step gives every
    process exactly A micro-batches of B; only a short last step of an epoch is uneven (possibly empty: the
    loop then runs a zero-weight pass so the gradient all-reduce still meets).
    """
    if num_processes == 1:
        return micro
    flat = [i for batch in micro for i in batch]
    base, extra = divmod(len(flat), num_processes)
    start = rank * base + min(rank, extra)
    mine = flat[start : start + base + (rank < extra)]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class EpochPlan:
    """Epochs over the whole pool, reshuffled per epoch from (seed, epoch), as the HF Trainer's sampler does.

    An epoch has ceil(N / B) micro-batches (the last may be short) and ceil(that / A) optimizer steps
    (the last may have fewer micro-batches); `max_steps` > 0 overrides `num_epochs`.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        grad_accum: int,
        *,
        seed: int,
        num_epochs: float = 1.0,
        max_steps: int = -1,
        shuffle: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError("EpochPlan needs a non-empty pool")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.shuffle = shuffle
        self.micro_per_epoch = math.ceil(num_samples / batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        self.num_steps = max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * self.steps_per_epoch))
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.num_samples, generator=gen).tolist()
            else:
                self._perm = list(range(self.num_samples))
            self._perm_epoch = epoch
        return self._perm

    def step_batches(self, step: int) -> list[list[int]]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        first = in_epoch * self.grad_accum
        last = min(first + self.grad_accum, self.micro_per_epoch)
        return [perm[m * self.batch_size : (m + 1) * self.batch_size] for m in range(first, last)]

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        # Fully determined by its arguments: recorded so a resume with other settings is caught.
        return {
            "kind": "epoch",
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
            "num_steps": self.num_steps,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "num_steps" and state.get(k) != v}
        if diff:
            from dataflex.core.errors import CheckpointError

            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"checkpoint was trained with another data plan ({detail}); resume with the same settings"
            )


class MixturePlan:
    """Steps drawn from a `MixedProportionManager`: each step takes B x A samples at the current proportions.

    Unlike `EpochPlan` it is sequential (the manager's draw counts advance), so the loop calls `step_batches`
    once per step in order; its state (the manager's) is in every checkpoint, so a resume continues exactly.
    `domain_offsets[d]` is the pool index of domain d's first row (the pool is built domain by domain).
    """

    def __init__(
        self, manager: Any, domain_offsets: list[int], batch_size: int, grad_accum: int, *, num_steps: int
    ) -> None:
        self.manager = manager
        self.offsets = list(domain_offsets)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.num_steps = num_steps
        self._next = 0

    def step_batches(self, step: int) -> list[list[int]]:
        if step != self._next:
            raise RuntimeError(f"MixturePlan is sequential: asked for step {step}, next is {self._next}")
        pairs = self.manager.draw(self.batch_size * self.grad_accum, step)
        self._next += 1
        idx = [self.offsets[d] + row for d, row in pairs]
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def epoch_at(self, step: int) -> float:
        return step * self.batch_size * self.grad_accum / max(self.manager.num_rows, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mixture", "next": self._next, "manager": self.manager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.manager.load_state_dict(state["manager"])
        self._next = int(state["next"])


class SelectPlan:
    """Dynamic selection: the run is cut into segments, each training on one index list (a warmup draw or a
    selector's selection) from its start step to its end step.

    A segment of L steps holds G·L indices (G = B × A per process), shuffled once (seeded by seed and start)
    and consumed in order, so every selected sample is trained on exactly once. Segments are added as the run
    reaches them; they are all in the plan's state, so a resume restores the active subset and the position.
    """

    def __init__(
        self, batch_size: int, grad_accum: int, *, num_steps: int, seed: int, steps_per_epoch: int | None = None
    ) -> None:
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.num_steps = num_steps
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.segments: list[dict[str, Any]] = []

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def add_segment(self, start: int, end: int, indices: list[int]) -> None:
        if end <= start:
            raise ValueError(f"empty segment [{start}, {end})")
        need = (end - start) * self.samples_per_step
        if len(indices) != need:
            raise ValueError(f"segment [{start}, {end}) needs {need} indices, got {len(indices)}")
        self.segments = [s for s in self.segments if s["start"] != start]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        order = torch.randperm(len(indices), generator=gen).tolist()
        self.segments.append({"start": start, "end": end, "indices": [int(indices[i]) for i in order]})
        self.segments.sort(key=lambda s: s["start"])

    def segment_at(self, step: int) -> dict[str, Any]:
        for seg in self.segments:
            if seg["start"] <= step < seg["end"]:
                return seg
        raise RuntimeError(f"no data segment covers step {step}; the selection for it has not been made")

    def step_batches(self, step: int) -> list[list[int]]:
        seg = self.segment_at(step)
        g = self.samples_per_step
        idx = seg["indices"][(step - seg["start"]) * g : (step - seg["start"] + 1) * g]
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch if self.steps_per_epoch else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "select",
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
            "segments": self.segments,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "select" or (state["batch_size"], state["grad_accum"]) != (
            self.batch_size,
            self.grad_accum,
        ):
            from dataflex.core.errors import CheckpointError

            raise CheckpointError("checkpoint was trained with another data plan; resume with the same settings")
        self.segments = [dict(s) for s in state["segments"]]
