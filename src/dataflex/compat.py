"""DataFlex's component interfaces over ours, so components written against DataFlex run unchanged.

What DataFlex's trainers handed to components, rebuilt from this project's seams:

- a weighter's `ctx` (DataFlex passes the HF Trainer): `ctx.state` (`global_step`, `max_steps`, `epoch`, ...) and
  `ctx.args` with the HF `TrainingArguments` names (`local_rank`, `process_index`, `world_size`, `n_gpu`, ...) over
  the run's arguments (`TrainerArgs`, `TrainerState`, `trainer_fields`);
- `mix(model, step_id, batch=, domain_ids=, data_collator=, dataset=)`, each keyword passed when the mixer's
  `mix` accepts it (`call_with_accepted`); `batch` is the last training micro-batch, `dataset` the rows drawn since
  the previous mix (`batch_of`, `MixedProportionManager.snapshot`);
- the mixer hooks DataFlex's MixTrainer called when a mixer has them: `update_batch_info(loss, domain_id)` after
  each micro-batch (`MixerInputs`), `get_current_doremi_weights()` for the loss (`DoReMiWeightsLoss`),
  `save_average_weights(output_dir)` at the end of training (`finish_mixer`);
- a selector's `data_collator` keeping the integer fields a caller adds to the rows, as LlamaFactory's did
  (DataFlex's selectors add `idx` and read it back): `KeepAddedFields`;
- a mixer's state kept in plain attributes (DataFlex's mixers have no `state_dict`), carried in TrainState and
  between mixing rounds (`attribute_state`);
- the files DataFlex's DoReMi and ODM mixers wrote, in their formats (`StepLog`, `odm_weights_entry`,
  `doremi_weights_entry`, `write_doremi_average_weights`).

`dataflex.utils.selector_io` is DataFlex's selection-cache module under its own name.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.data.processing import FEATURES as POOL_COLUMNS
from dataflex.train.trainer.callbacks import Callback, TrainContext
from dataflex.train.trainer.losses import LossStrategy, MicroBatchLosses
from dataflex.utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "DoReMiWeightsLoss",
    "KeepAddedFields",
    "MixerInputs",
    "StepLog",
    "TrainerArgs",
    "TrainerState",
    "attribute_state",
    "batch_of",
    "call_with_accepted",
    "doremi_weights_entry",
    "finish_mixer",
    "load_attribute_state",
    "mixer_loss",
    "odm_weights_entry",
    "trainer_fields",
    "write_doremi_average_weights",
]


# ----------------------------------------------------------------------------- the weighter's ctx


@dataclass(frozen=True)
class TrainerState:
    """The HF `TrainerState` fields a DataFlex weighter reads as `ctx.state`."""

    global_step: int
    max_steps: int
    epoch: float
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True


class TrainerArgs:
    """`ctx.args` as the HF Trainer has it: the run's arguments (already HF-named) plus the HF names that describe the
    launch (`local_rank`, `process_index`, `world_size`, `n_gpu`, `device`, ...)."""

    def __init__(self, args: Any, accelerator: Any) -> None:
        self._args = args
        self._acc = accelerator

    def __getattr__(self, name: str) -> Any:
        # Only called for names not defined here: the run's own arguments (output_dir, seed, learning_rate, ...).
        if name.startswith("_"):  # copy / pickle probe before __init__ ran: no recursion into self._args
            raise AttributeError(name)
        return getattr(self._args, name)

    @property
    def world_size(self) -> int:
        return self._acc.num_processes if self._acc is not None else 1

    @property
    def process_index(self) -> int:
        return self._acc.process_index if self._acc is not None else 0

    @property
    def local_process_index(self) -> int:
        return self._acc.local_process_index if self._acc is not None else 0

    @property
    def local_rank(self) -> int:
        """-1 when not distributed, as in HF (DataFlex logs on `local_rank in [-1, 0]`)."""
        return self.local_process_index if self.world_size > 1 else -1

    @property
    def device(self) -> torch.device:
        return self._acc.device if self._acc is not None else torch.device("cpu")

    @property
    def n_gpu(self) -> int:
        """GPUs per process (HF: 1 under DDP, 0 on CPU)."""
        return 1 if self.device.type == "cuda" else 0

    @property
    def train_batch_size(self) -> int:
        return self._args.per_device_train_batch_size

    @property
    def fp16(self) -> bool:
        return self._args.mixed_precision == "fp16"

    @property
    def bf16(self) -> bool:
        return self._args.mixed_precision == "bf16"

    @property
    def torch_empty_cache_steps(self) -> int | None:
        return None


def trainer_fields(ctx: TrainContext) -> dict[str, Any]:
    """The weighter context's `args` and `state` with the HF Trainer's names (DataFlex passes the Trainer as ctx)."""
    acc = ctx.accelerator
    main = acc is None or acc.is_main_process
    local_main = acc is None or acc.is_local_main_process
    return {
        "args": TrainerArgs(ctx.args, acc),
        "state": TrainerState(ctx.global_step, ctx.max_steps, ctx.epoch, main, local_main),
    }


# ----------------------------------------------------------------------------- calling by signature


def call_with_accepted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` with only the keywords `fn` accepts (all of them when it takes `**kwargs`): DataFlex's
    components name the objects they want, and a `mix(self, model, step_id)` must not fail on `batch=`."""
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return fn(*args, **kwargs)


def batch_of(pool: Any, ids: Sequence[int], collator: Callable[..., Any], device: Any) -> dict[str, torch.Tensor]:
    """The micro-batch of the pool's samples `ids` (their `sample_id`s), collated and on `device` (as the loop built
    it). A pool built by the pipeline numbers its rows 0..N-1; a subset keeps its samples' ids, so map them."""
    sample_ids = pool["sample_id"]
    row_of = {int(s): r for r, s in enumerate(sample_ids)} if list(sample_ids) != list(range(len(pool))) else None
    rows = [pool[row_of[int(i)] if row_of is not None else int(i)] for i in ids]
    return {k: v.to(device) for k, v in collator(rows).items()}


class KeepAddedFields:
    """`collator`, plus every integer field the caller added to all rows (not a column of the pool: those the
    collator keeps or drops on purpose) as a (B,) int64 tensor, as LlamaFactory's collator passed `idx` through."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collator = collator
        self.own = set(POOL_COLUMNS)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        added = set(features[0]) - self.own - set(batch) if features else set()
        for key in sorted(added):
            values = [f.get(key) for f in features]
            if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------- the mixer's hooks


def _defines(obj: Any, name: str) -> bool:
    return callable(getattr(type(obj), name, None))


class MixerInputs(Callback):
    """What DataFlex's MixTrainer gave a mixer from inside its loop.

    Keeps the last micro-batch's pool rows (the `batch` of the next `mix` call; in TrainState, so a mixing round
    that resumes the checkpoint sees it), and calls the mixer's `update_batch_info(loss, domain_id)` after each
    micro-batch when it has one, with DataFlex's arguments: the micro-batch's token-mean loss and its first sample's
    domain."""

    def __init__(self, mixer: Any) -> None:
        self.mixer = mixer
        self.batch_info = _defines(mixer, "update_batch_info")  # decided once: the loop never probes
        self.last_ids: torch.Tensor | list[int] = []

    def on_micro_batch(self, losses: MicroBatchLosses, ctx: TrainContext) -> None:
        if losses.sample_id is not None:
            self.last_ids = losses.sample_id.detach()  # converted when saved: no device sync per micro-batch
        if self.batch_info and losses.domain_id is not None and losses.domain_id.numel():
            loss = losses.token_loss_sum.detach().sum() / losses.token_count.sum().clamp(min=1)
            self.mixer.update_batch_info(float(loss), int(losses.domain_id[0]))

    @property
    def last_batch(self) -> list[int]:
        ids = self.last_ids
        return [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch": self.last_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_ids = list(state.get("last_batch", []))


class DoReMiWeightsLoss(LossStrategy):
    """DataFlex's MixTrainer loss for a mixer with `get_current_doremi_weights()`: each sample's token-mean loss
    times its domain's current weight, averaged over the micro-batch and then over the step's micro-batches."""

    def __init__(self, mixer: Any) -> None:
        self.mixer = mixer

    def loss(
        self, losses: MicroBatchLosses, ctx: TrainContext, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        per_sample = losses.per_sample_loss
        if losses.domain_id is None:
            return losses.standard_loss()
        w = torch.as_tensor(
            np.asarray(self.mixer.get_current_doremi_weights(), dtype=np.float64),
            dtype=per_sample.dtype,
            device=per_sample.device,
        )
        return (per_sample * w[losses.domain_id.to(per_sample.device)]).mean() / ctx.num_micro_batches


def mixer_loss(mixer: Any) -> LossStrategy | None:
    """The loss DataFlex trained a mixer's run with: α-weighted when the mixer has `get_current_doremi_weights`."""
    return DoReMiWeightsLoss(mixer) if _defines(mixer, "get_current_doremi_weights") else None


def finish_mixer(mixer: Any, output_dir: str | Path, accelerator: Any) -> None:
    """End of training: the mixer's `save_average_weights(output_dir)` when it has one, on the main process."""
    if _defines(mixer, "save_average_weights") and (accelerator is None or accelerator.is_main_process):
        mixer.save_average_weights(str(output_dir))


# ----------------------------------------------------------------------------- state kept in attributes

_ARRAY = "__ndarray__"


def _encode(value: Any) -> Any:
    """JSON form of learned state (numbers, arrays, lists and str-keyed dicts of them); raises TypeError otherwise.
    Bools and strings are refused: they are set-up (a path, a `loaded` flag) the constructor derives again, and
    restoring a flag without the object it describes would break the component."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_ | str):
        raise TypeError("set-up, not state")
    if isinstance(value, int | float):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "iuf":
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and _ARRAY not in value:
        return {k: _encode(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _ARRAY in value:
            return np.asarray(value[_ARRAY], dtype=value["dtype"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def attribute_state(obj: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The learned state a component keeps in its attributes (DataFlex's mixers have no `state_dict`): every
    attribute holding numbers or numeric arrays (lists and dicts of them too), as JSON."""
    out = {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        try:
            out[name] = _encode(value)
        except TypeError:
            continue  # objects (models, datasets, the manager) and set-up are not state
    return out


def load_attribute_state(obj: Any, state: Mapping[str, Any]) -> None:
    """Restore `attribute_state`'s result; an attribute that now holds an object is left alone."""
    current = vars(obj)
    for name, value in state.items():
        if name in current:
            try:
                _encode(current[name])
            except TypeError:
                continue
        setattr(obj, name, _decode(value))


# ----------------------------------------------------------------------------- DataFlex's mixer files


class StepLog:
    """A DataFlex `<name>.jsonl`: one JSON object per update, appended, each with its `step`. A resumed run first
    drops the lines at or after its first step, which the run it replaces had written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._checked = False

    def append(self, entry: Mapping[str, Any]) -> None:
        step = int(entry["step"])
        if not self._checked and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) < step]
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._checked = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(dict(entry)) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # not a step line: kept


def _timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def odm_weights_entry(
    step: int, names: Sequence[str], weights: Any, rewards: Any, exploration_rate: float, alpha: float
) -> dict[str, Any]:
    """A line of DataFlex's `odm_weights.jsonl`."""
    return {
        "step": int(step),
        "timestamp": _timestamp(),
        "domain_names": list(names),
        "domain_weights": np.asarray(weights, dtype=float).tolist(),
        "estimated_rewards": np.asarray(rewards, dtype=float).tolist(),
        "exploration_rate": float(exploration_rate),
        "alpha": float(alpha),
    }


def doremi_weights_entry(step: int, names: Sequence[str], weights: Any, scores: Any) -> dict[str, Any]:
    """A line of DataFlex's `doremi_weights.jsonl` (`perdomain_scores`: the excess losses of the update)."""
    return {
        "step": int(step),
        "timestamp": _timestamp(),
        "domain_names": list(names),
        "domain_weights": np.asarray(weights, dtype=float).tolist(),
        "perdomain_scores": np.asarray(scores, dtype=float).tolist(),
    }


def write_doremi_average_weights(output_dir: str | Path, names: Sequence[str], weights: Any, updates: int) -> None:
    """DataFlex's end-of-proxy files: `doremi_average_weights.json` and `doremi_step3_proportions.txt`."""
    out = Path(output_dir)
    avg = np.asarray(weights, dtype=float)
    atomic_write_json(
        out / "doremi_average_weights.json",
        {
            "description": "DoReMi Step 2: average domain weights for Step 3",
            "update_times": int(updates),
            "domain_names": list(names),
            "average_weights": avg.tolist(),
        },
        indent=2,
    )
    lines = ["# DoReMi Step 3 proportions", f"# proportions: {avg.tolist()}"]
    lines += [f"{name}: {w:.6f}" for name, w in zip(names, avg)]
    atomic_write_text(out / "doremi_step3_proportions.txt", "\n".join(lines) + "\n")
