"""Dynamic selection (`train_type: dynamic_select`) as segments of one run.

Schedule (DataFlex's, spec dataflex-selection.md §2.2), with G = batch × accumulation × processes: a flex
epoch has E = w + u·T optimizer steps (T = update_times ≥ 1), or ceil(N/G) when T ≤ 0 and no train_step, or is
unbounded when T ≤ 0 and train_step > 0. The run has train_step steps, else ceil(num_train_epochs · E). At the
start of each flex epoch the selector's `warmup` draws the warmup data (fresh per flex epoch, seeded by run seed
and epoch; DataFlex reused one draw); at r = w, w+u, ... (r = step within the flex epoch) it selects. Each
selection has G × (steps until the next event) samples, at most G·u, and is consumed exactly once.

Round 0 trains from step 0 to the first selection; round k ≥ 1 runs `compute_features` (what the selector needs:
losses, gradient features), `compute_selection` and `train_segment` up to the next selection. Each segment
resumes the previous one's TrainState (weights, optimizer, plan with every segment's indices, selector state),
so the chain equals one uninterrupted run. Kedro unrolls the rounds as `dynamic_select.round_<k>`; this module
works without Kedro.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from dataflex.core.errors import ConfigError, DataFlexError
from dataflex.core.registry import REGISTRY
from dataflex.data import DataCollatorForCausalLM, dataset_fingerprint, domain_names
from dataflex.distributed.launch import distributed, launch
from dataflex.models import load_tokenizer, model_fingerprint, save_trained
from dataflex.train.runner import build_model, load_checkpoint_model
from dataflex.train.trainer import Trainer, TrainingArguments, make_accelerator
from dataflex.train.trainer.plan import SelectPlan
from dataflex.train.trainer.state import capture_rng, read_manifest, restore_rng
from dataflex.utils.io import atomic_write_json, sha256_json
from dataflex.utils.logging import logger

MetricsSink = Callable[[dict[str, float], int], None]


class SelectionError(DataFlexError):
    """A selector returned an unusable selection (wrong length, out-of-range or non-integer indices)."""


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


def select_schedule(
    flex: Mapping[str, Any], train: Mapping[str, Any], pool_size: int | None, num_processes: int | None = None
) -> SelectSchedule:
    """The exact schedule of spec §2.2 (see the module docstring); processes default to train's num_processes."""
    w, u, t, s = (int(flex.get(k) or 0) for k in ("warmup_step", "update_step", "update_times", "train_step"))
    num_processes = int(num_processes or train.get("num_processes") or 1)
    if w < 1 or u < 1:
        raise ConfigError(f"dynamic_select needs warmup_step >= 1 and update_step >= 1, got {w} and {u}")
    g = int(train["per_device_train_batch_size"]) * int(train.get("gradient_accumulation_steps", 1)) * num_processes
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
    max_steps = s if s > 0 else max(1, math.ceil(float(train.get("num_train_epochs", 1.0)) * epoch))
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


def build_selector(flex: Mapping[str, Any], runtime: Mapping[str, Any]) -> tuple[str, Any]:
    _, registered, params = _component(flex)
    runtime = dict(runtime)
    if "cache_dir" in params:
        runtime.pop("cache_dir", None)  # the user's cache_dir wins over the run's default
    return registered, REGISTRY.build("selector", registered, runtime=runtime, cfg=params)


def check_select_config(
    flex: Mapping[str, Any], train: Mapping[str, Any], has_eval: bool, pool_size: int | None = None
) -> None:
    """Select-specific config errors, before any work (pool-size checks when the size is known)."""
    _, name, params = _component(flex)
    if name == "less" and not has_eval:
        raise ConfigError("selector 'less' needs an eval_dataset (the target task's examples); set eval_dataset")
    sched = select_schedule(flex, train, pool_size if pool_size is not None else 1 << 30)
    if pool_size is not None:
        need = sched.global_batch * int(flex["update_step"])
        if need > pool_size and not params.get("replacement", False):
            raise ConfigError(
                f"each selection takes G x update_step = {need} samples but the pool has {pool_size}; "
                "lower update_step or the batch size, or use a selector with replacement"
            )


def _component(flex: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    from dataflex.train.runner import component_for

    return component_for({**flex, "train_type": "dynamic_select"})


def _component_class(flex: Mapping[str, Any]) -> Any:
    return REGISTRY.get("selector", _component(flex)[1])


def target_dataset(eval_sets: Mapping[str, Any] | None) -> Any:
    """The eval sets as one target dataset; `domain_id` = which eval set (the subtasks of LESS's max)."""
    if not eval_sets:
        return None
    parts = []
    for k, name in enumerate(eval_sets):
        ds = eval_sets[name].select_columns(["input_ids", "labels"])
        parts.append(ds.add_column("domain_id", [k] * len(ds)))
    return datasets.concatenate_datasets(parts)


class _SelectRun:
    """A Trainer with a SelectPlan and the selector, resumed from a TrainState when given."""

    def __init__(
        self,
        train_pool: Any,
        eval_sets: Any,
        model_params: Mapping[str, Any],
        train_params: Mapping[str, Any],
        flex: Mapping[str, Any],
        resume: str | None,
        metrics_sink: MetricsSink | None,
    ) -> None:
        self.args = TrainingArguments.from_dict({**train_params, "resume_from_checkpoint": resume})
        self.flex = flex
        self.pool = train_pool
        check_select_config(flex, train_params, bool(eval_sets), len(train_pool))  # pool-size checks, before training
        self.schedule = select_schedule(flex, train_params, len(train_pool))
        self.tokenizer = load_tokenizer(model_params["model_name_or_path"])
        self.collator = DataCollatorForCausalLM(self.tokenizer)
        accelerator = make_accelerator(self.args)
        self.base_id = model_fingerprint(model_params["model_name_or_path"])
        runtime = {
            "dataset": train_pool,
            "eval_dataset": target_dataset(eval_sets),
            "accelerator": accelerator,
            "data_collator": self.collator,
            "cache_dir": str(Path(self.args.output_dir) / "selector_cache"),
        }
        self.name, self.selector = build_selector(flex, runtime)
        self.plan = SelectPlan(
            self.args.per_device_train_batch_size,
            self.args.gradient_accumulation_steps * self.args.num_processes,
            num_steps=self.schedule.max_steps,
            seed=self.args.seed,
            steps_per_epoch=self.schedule.epoch_steps,
        )
        self.trainer = Trainer(
            build_model(model_params, seed=self.args.seed),
            train_pool,
            self.args,
            data_collator=self.collator,
            plan=self.plan,
            components={"selector": self.selector},
            metrics_sink=metrics_sink,
            domain_names=domain_names(train_pool),
            accelerator=accelerator,
            model_fingerprint=self.base_id,
        )
        self.trainer.restore()

    @property
    def model(self) -> Any:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def add_warmups(self, start: int, end: int) -> None:
        """Warmup segments of the flex epochs that begin in [start, end), drawn by the selector's `warmup`."""
        n = len(self.pool)
        for e in self.schedule.events:
            if e.kind == "warmup" and start <= e.step < end:
                self.selector.flex_epoch = e.flex_epoch
                count = self.schedule.global_batch * (e.end - e.step)
                indices = self.selector.warmup(count, replacement=count > n)
                check_indices(indices, count, n, f"selector '{self.name}' warmup at step {e.step}")
                self.plan.add_segment(e.step, e.end, indices)

    def selection_key(self, event: Event, checkpoint: str | None) -> str:
        """Content key of a selection: model and optimizer state, selector state, data, selector config, step."""
        files = read_manifest(checkpoint, verify_hashes=False)["files"] if checkpoint else {}
        return sha256_json(
            {
                "weights": files.get("trainable.safetensors"),
                "optimizer": files.get("optimizer.safetensors"),
                "selector_state": self.selector.state_dict(),
                "pool": dataset_fingerprint(self.pool),
                "eval": _eval_fingerprint(self.selector),
                "selector": self.name,
                "params": _component(self.flex)[2],
                "step": event.step,
                "num_samples": self.num_samples(event),
                "base": self.base_id,
            }
        )

    def num_samples(self, event: Event) -> int:
        return self.schedule.global_batch * (event.end - event.step)


def _eval_fingerprint(selector: Any) -> Any:
    ev = getattr(selector, "eval_dataset", None)
    if ev is None:
        return None
    from dataflex.features import sample_hashes

    return sha256_json(sample_hashes(ev))


def check_indices(indices: Any, expected: int, pool_size: int, where: str) -> list[int]:
    """A selection must be `expected` integers in [0, pool_size): SelectionError (one line) otherwise."""
    if not isinstance(indices, list | tuple) and not hasattr(indices, "tolist"):
        raise SelectionError(f"{where} returned {type(indices).__name__}, not a list of pool indices")
    values = list(indices.tolist() if hasattr(indices, "tolist") else indices)
    if len(values) != expected:
        raise SelectionError(f"{where} returned {len(values)} indices; it must return exactly num_samples={expected}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < pool_size]
    if bad:
        raise SelectionError(
            f"{where} returned index {bad[0]!r}, outside the pool [0, {pool_size}); return "
            "positions in the train dataset"
        )
    return [int(v) for v in values]


def train_segment(
    train_pool: Any,
    eval_sets: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    round_k: int,
    previous: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train round `round_k` on `selection` (and any warmup data of flex epochs starting inside it); on
    num_processes accelerate workers when that is > 1."""
    if distributed(train_params):
        return launch(
            "dataflex.train.select:train_segment",
            train_params,
            datasets={"train_pool": train_pool, "eval_sets": eval_sets},
            kwargs={
                "model_params": dict(model_params),
                "train_params": dict(train_params),
                "flex": dict(flex),
                "round_k": round_k,
                "previous": previous and dict(previous),
                "selection": selection and dict(selection),
            },
            metrics_sink=metrics_sink,
        )
    run = _SelectRun(
        train_pool, eval_sets, model_params, train_params, flex, previous and previous["checkpoint"], metrics_sink
    )
    start, end = run.schedule.round_range(round_k)
    # A save_steps checkpoint inside the round resumes there: its plan already holds the active subset.
    if not start <= run.trainer.global_step < end:
        raise ConfigError(
            f"round {round_k} covers steps [{start}, {end}) but its input state is at step {run.trainer.global_step}"
        )
    if selection is not None:
        run.selector.load_state_dict(selection.get("selector_state") or {})
        run.plan.add_segment(selection["step"], selection["end"], selection["indices"])
    run.add_warmups(start, end)
    result = run.trainer.train(until_step=end)
    checkpoint = run.trainer.save_checkpoint()
    return {
        "round": round_k,
        "step": result.global_step,
        "checkpoint": str(checkpoint),
        "last_train_loss": result.final_train_loss,
    }


# compute_features hands its set-up (model, optimizer, selector restored from the round's TrainState) to the
# compute_selection that follows in the same process, instead of both nodes rebuilding it. Keyed by everything
# the set-up depends on; the selector's restored state and the RNG state are re-applied, so a hand-over equals a
# fresh build.
_HANDOVER: dict[str, tuple[_SelectRun, dict[str, Any], Any]] = {}


def _handover_key(
    train_pool: Any,
    eval_sets: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    checkpoint: str,
) -> str:
    manifest = Path(checkpoint) / "manifest.json"
    return sha256_json(
        {
            "checkpoint": str(Path(checkpoint).resolve()),
            "manifest": manifest.stat().st_mtime_ns if manifest.exists() else None,
            "pool": dataset_fingerprint(train_pool),
            "model": dict(model_params),
            "train": dict(train_params),
            "flex": dict(flex),
            "eval": {k: dataset_fingerprint(v) for k, v in (eval_sets or {}).items()},
        }
    )


def _take_run(
    train_pool: Any,
    eval_sets: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    checkpoint: str,
) -> _SelectRun:
    key = _handover_key(train_pool, eval_sets, model_params, train_params, flex, checkpoint)
    if key in _HANDOVER:
        run, selector_state, rng = _HANDOVER.pop(key)
        run.selector.load_state_dict(selector_state)
        restore_rng(*rng)
        return run
    return _SelectRun(train_pool, eval_sets, model_params, train_params, flex, checkpoint, None)


def compute_features(
    train_pool: Any,
    eval_sets: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    previous: Mapping[str, Any],
) -> dict[str, Any]:
    """What the selector needs for round previous+1, from the model and optimizer at that point (cached); with
    num_processes > 1 computed by that many workers, each on a share of the pool."""
    if distributed(train_params) and hasattr(_component_class(flex), "compute_features"):
        return launch(
            "dataflex.train.select:compute_features",
            train_params,
            datasets={"train_pool": train_pool, "eval_sets": eval_sets},
            kwargs={
                "model_params": dict(model_params),
                "train_params": dict(train_params),
                "flex": dict(flex),
                "previous": dict(previous),
            },
        )
    run = _SelectRun(train_pool, eval_sets, model_params, train_params, flex, previous["checkpoint"], None)
    restored, rng = run.selector.state_dict(), capture_rng()
    event = run.schedule.selections[previous["round"]]
    feats: dict[str, Any] = {}
    if hasattr(run.selector, "compute_features"):
        feats = run.selector.compute_features(
            run.model, event.step, optimizer=run.trainer.optimizer, base_model_id=run.base_id, tokenizer=run.tokenizer
        )
    _HANDOVER.clear()  # at most one set-up (one model) is kept
    key = _handover_key(train_pool, eval_sets, model_params, train_params, flex, previous["checkpoint"])
    _HANDOVER[key] = (run, restored, rng)
    return {"step": event.step, "selector": run.name, "features": feats}


def compute_selection(
    train_pool: Any,
    eval_sets: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    previous: Mapping[str, Any],
    features: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The selector's choice for round previous+1; written to OUTPUT_DIR/selections/step_<g>.json and reused when
    the same model state, data, selector config and step come again."""
    run = _take_run(train_pool, eval_sets, model_params, train_params, flex, previous["checkpoint"])
    event = run.schedule.selections[previous["round"]]
    k = run.num_samples(event)
    key = run.selection_key(event, previous["checkpoint"])
    path = Path(run.args.output_dir) / "selections" / f"step_{event.step}.json"
    cached = _read(path)
    if cached is not None and cached.get("key") == key:
        logger.info("selection at step %d: cache hit %s", event.step, path)
        return {**cached, "cache": "hit"}
    where = f"selector '{run.name}' at step {event.step}"
    run.selector.last_metric = {}
    indices = run.selector.select(
        run.model,
        event.step,
        k,
        features=(features or {}).get("features") or None,
        optimizer=run.trainer.optimizer,
        optimizer_state=run.trainer.optimizer.state,
        scheduler_state=run.trainer.scheduler.state_dict(),
        current_update_times=event.current,
        update_times=event.update_times,
        tokenizer=run.tokenizer,
        base_model_id=run.base_id,
    )
    indices = check_indices(indices, k, len(train_pool), where)
    names = domain_names(train_pool)
    dom = train_pool["domain_id"]
    counts = Counter(names[dom[i]] for i in indices)
    out = {
        "step": event.step,
        "end": event.end,
        "indices": indices,
        "metric": getattr(run.selector, "last_metric", {}),
        "domain_counts": {n: counts.get(n, 0) for n in names},
        "selector": run.name,
        "key": key,
        "selector_state": run.selector.state_dict(),
        "current_update_times": event.current,
        "update_times": event.update_times,
    }
    atomic_write_json(path, out)
    logger.info(
        "selection at step %d (%s): %s",
        event.step,
        run.name,
        ", ".join(f"{n}={c}" for n, c in out["domain_counts"].items() if c),
    )
    return {**out, "cache": "miss"}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finalize(
    last: Mapping[str, Any],
    selections: list[Mapping[str, Any]],
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
) -> dict[str, Any]:
    """Save the final adapter / model; return the train result with the per-round selection composition."""
    tokenizer = load_tokenizer(model_params["model_name_or_path"])
    model = load_checkpoint_model(model_params, last["checkpoint"], int(train_params["seed"]))
    out = Path(train_params["output_dir"])
    kind = "adapter" if model_params["finetuning_type"] == "lora" else "model"
    save_trained(model, out / kind, tokenizer=tokenizer)
    state = json.loads((Path(last["checkpoint"]) / "trainer_state.json").read_text())
    history = state["log_history"]
    composition = [
        {"step": s["step"], "domain_counts": s["domain_counts"], "cache": s.get("cache")} for s in selections
    ]
    atomic_write_json(out / "selections" / "composition.json", composition)
    return {
        "train_type": "dynamic_select",
        "component_name": flex.get("component_name"),
        "output_dir": str(out),
        "finetuning_type": model_params["finetuning_type"],
        "model_name_or_path": model_params["model_name_or_path"],
        f"{kind}_dir": str(out / kind),
        "domains": domain_names(train_pool),
        "global_step": state["global_step"],
        "train_samples_seen": state["samples_seen"],
        "train_tokens_seen": state["tokens_seen"],
        "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "train_loss_mean": state["loss_sum_all"] / max(state["global_step"], 1),
        "log_history": history,
        "selection_history": composition,
        "last_checkpoint": last["checkpoint"],
    }


def run_all(
    train_pool: Any,
    eval_sets: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """Every round in order (what the Kedro pipeline unrolls), for use without Kedro."""
    n = select_schedule(flex, train_params, len(train_pool)).num_rounds
    state = train_segment(train_pool, eval_sets, model_params, train_params, flex, 0, metrics_sink=metrics_sink)
    selections = []
    for k in range(1, n):
        feats = compute_features(train_pool, eval_sets, model_params, train_params, flex, state)
        sel = compute_selection(train_pool, eval_sets, model_params, train_params, flex, state, feats)
        selections.append(sel)
        state = train_segment(train_pool, eval_sets, model_params, train_params, flex, k, state, sel, metrics_sink)
    return finalize(state, selections, train_pool, model_params, train_params, flex)
