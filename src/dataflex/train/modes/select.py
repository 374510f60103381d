"""`dynamic_select`: the run is cut into segments at the selector's events (`dataflex.train.schedule`).

Round 0 trains from step 0 to the first selection on the selector's warm-up draw (every flex epoch draws afresh,
seeded by the run seed and the flex epoch only: the mode sets the selector's `run_seed` and `flex_epoch` before
`warmup`, and `flex_epoch` before `select`); round k ≥ 1 computes what the selector needs (`select_round`:
features, e.g. losses or gradient features, then the selection) and trains up to the next selection
(`train_segment`). Each segment resumes the previous one's TrainState (weights, optimizer,
plan with every segment's indices, selector state), so the chain equals one uninterrupted run. Kedro unrolls
the rounds as `dynamic_select.round_<k>`; `run_all` runs them without Kedro.

The target handed to the selector is the eval sets concatenated (`domain_id` = which eval set); a selector
parameter `subtask_column` (less, cluster_less, nice) adds that column of each target row's raw row, read back
from its dev file through the row's `source_row`, to split the eval sets further into LESS's subtasks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from dataflex.core.errors import ConfigError, DataError, DataFlexError
from dataflex.core.registry import REGISTRY
from dataflex.data import dataset_fingerprint, domain_names
from dataflex.distributed.launch import MetricsSink, distributable
from dataflex.train.modes import component_for
from dataflex.train.run import Mode, Run
from dataflex.train.schedule import Event, select_schedule
from dataflex.train.trainer import Callback
from dataflex.train.trainer.plan import SelectPlan
from dataflex.train.trainer.state import capture_rng, read_manifest, restore_rng
from dataflex.utils.io import atomic_write_json, sha256_json
from dataflex.utils.logging import logger

__all__ = [
    "SelectMode",
    "SelectionError",
    "check_indices",
    "check_select_config",
    "finalize",
    "raw_column",
    "run_all",
    "select_round",
    "target_dataset",
    "train_segment",
]


class SelectionError(DataFlexError):
    """A selector returned an unusable selection (wrong length, out-of-range or non-integer indices)."""


def check_select_config(cfg: Any, has_eval: bool, pool_size: int | None = None) -> None:
    """Select-specific config errors, before any work (pool-size checks when the size is known)."""
    flex = cfg.dataflex
    name, params = component_for(flex, "selector")
    if name == "less" and not has_eval:
        raise ConfigError("selector 'less' needs an eval_dataset (the target task's examples); set eval_dataset")
    if pool_size is None and flex.update_times <= 0 and flex.train_step <= 0:
        # The flex epoch is the pool (DataFlex's "update until the epochs end"): checked when the pool is known.
        if flex.warmup_step < 1 or flex.update_step < 1:
            raise ConfigError(
                f"dynamic_select needs warmup_step >= 1 and update_step >= 1, got {flex.warmup_step} and "
                f"{flex.update_step}"
            )
        return
    sched = select_schedule(flex, cfg.train, pool_size if pool_size is not None else 1 << 30)
    if not sched.selections:
        raise ConfigError(
            f"the run has {sched.max_steps} steps and selects first at warmup_step={flex.warmup_step}: the selector "
            "would never be called; lower warmup_step or train longer (train_step / num_train_epochs)"
        )
    if pool_size is not None:
        need = sched.global_batch * flex.update_step
        if need > pool_size and not params.get("replacement", False):
            raise ConfigError(
                f"each selection takes G x update_step = {need} samples but the pool has {pool_size}; "
                "lower update_step or the batch size, or use a selector with replacement"
            )
        if params.get("exclude_selected") is True:
            _check_exclusion(sched, pool_size)


def _check_exclusion(sched: Any, pool_size: int) -> None:
    """exclude_selected picks a row at most once per flex epoch: each flex epoch's selections must fit the pool."""
    per_epoch: Counter[int] = Counter()
    for e in sched.selections:
        per_epoch[e.flex_epoch] += sched.global_batch * (e.end - e.step)
    epoch, rows = max(per_epoch.items(), key=lambda kv: kv[1])
    if rows > pool_size:
        raise ConfigError(
            f"exclude_selected picks a row at most once per flex epoch, but flex epoch {epoch} selects {rows} rows "
            f"and the pool has {pool_size}; lower update_step, update_times or the batch size, or set "
            "exclude_selected: false"
        )


def target_dataset(
    eval_sets: Mapping[str, Any] | None, subtask_column: str | None = None, dataset_dir: str | None = None
) -> Any:
    """The eval sets as one target dataset; `domain_id` = which eval set (the subtasks of LESS's max), plus the raw
    rows' `subtask_column` (strings) when given, which splits each eval set further into subtasks."""
    if not eval_sets:
        return None
    parts = []
    for k, name in enumerate(eval_sets):
        ds = eval_sets[name].select_columns(["input_ids", "labels"])
        ds = ds.add_column("domain_id", [k] * len(ds))
        if subtask_column is not None:
            ds = ds.add_column(subtask_column, subtask_values(eval_sets[name], subtask_column, dataset_dir))
        parts.append(ds)
    return datasets.concatenate_datasets(parts)


def subtask_values(ds: Any, column: str, dataset_dir: str | None) -> list[str]:
    """`column` of each row of a processed dataset, as strings: its own column if it has one, else its raw rows'."""
    if column in ds.column_names:
        return [str(v) for v in ds[column]]
    if dataset_dir is None:
        raise ConfigError(f"subtask_column {column!r}: the target rows have no such column and no dataset_dir is known")
    return raw_column(ds, column, dataset_dir)


def raw_column(ds: Any, column: str, dataset_dir: str) -> list[str]:
    """`column` of the raw row behind each row of a processed dataset (its dataset by `domain_id` and the metadata's
    domain names, its row by `source_row`, read as the processing read it), as strings."""
    from dataflex.data.dataset_info import resolve_datasets
    from dataflex.data.readers import read_rows

    names = domain_names(ds)
    attrs = {a.name: a for a in resolve_datasets(names, dataset_dir)}
    raw: dict[str, list[dict[str, Any]]] = {}
    out = []
    for dom, src in zip(ds["domain_id"], ds["source_row"]):
        name = names[dom]
        if src < 0:
            raise ConfigError(
                f"subtask_column {column!r}: dataset '{name}' has packed pt blocks, which span several raw rows; "
                "set packing: false"
            )
        if name not in raw:
            raw[name] = read_rows(attrs[name], dataset_dir)  # seed 0, as processing reads them
        value = raw[name][src].get(column)
        if value is None:
            raise DataError(f"subtask_column {column!r}: row {src} of dataset '{name}' has no {column!r} value")
        out.append(str(value))
    return out


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


class SelectMode(Mode):
    name = "dynamic_select"

    def __init__(self, cfg: Any, pool_size: int) -> None:
        super().__init__(cfg, pool_size)
        self.schedule = select_schedule(cfg.dataflex, cfg.train, pool_size)

    def components(self, run: Run) -> dict[str, Callback]:
        check_select_config(self.cfg, bool(run.eval_sets), self.pool_size)  # pool-size checks, before training
        self.component, self.params = component_for(self.cfg.dataflex, "selector")
        target = target_dataset(run.eval_sets, self.params.get("subtask_column"), run.cfg.data.dataset_dir)
        runtime = run.runtime(eval_dataset=target)
        if "cache_dir" not in self.params:  # the user's cache_dir wins over the run's default
            runtime["cache_dir"] = str(Path(run.args.output_dir) / "selector_cache")
        return {"selector": REGISTRY.build("selector", self.component, runtime=runtime, cfg=self.params)}

    def plan(self, run: Run) -> SelectPlan:
        args = run.args
        return SelectPlan(
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps * args.num_processes,
            num_steps=self.schedule.max_steps,
            seed=args.seed,
            steps_per_epoch=self.schedule.epoch_steps,
        )

    # -- between segments ------------------------------------------------------------------------------

    def add_warmups(self, run: Run, start: int, end: int) -> None:
        """Warm-up segments of the flex epochs that begin in [start, end), drawn by the selector's `warmup`, seeded
        by (run seed, flex epoch) only (never by the selector's own `seed`)."""
        selector, n = run.callbacks["selector"], len(run.pool)
        for e in self.schedule.events:
            if e.kind == "warmup" and start <= e.step < end:
                selector.run_seed, selector.flex_epoch = int(run.args.seed), e.flex_epoch
                count = self.schedule.global_batch * (e.end - e.step)
                indices = selector.warmup(count, replacement=count > n)
                check_indices(indices, count, n, f"selector '{self.component}' warmup at step {e.step}")
                run.trainer.plan.add_segment(e.step, e.end, indices)

    def num_samples(self, event: Event) -> int:
        return self.schedule.global_batch * (event.end - event.step)

    def selection_key(self, run: Run, event: Event, checkpoint: str | None) -> str:
        """Content key of a selection: model and optimizer state, selector state, data, selector config, step."""
        files = read_manifest(checkpoint, verify_hashes=False)["files"] if checkpoint else {}
        selector = run.callbacks["selector"]
        return sha256_json(
            {
                "weights": files.get("trainable.safetensors"),
                "optimizer": files.get("optimizer.safetensors"),
                "selector_state": selector.state_dict(),
                "pool": dataset_fingerprint(run.pool),
                "eval": _eval_fingerprint(selector),
                "selector": self.component,
                "params": self.params,
                "step": event.step,
                "num_samples": self.num_samples(event),
                "base": run.base_id,
            }
        )


def _eval_fingerprint(selector: Any) -> Any:
    ev = getattr(selector, "eval_dataset", None)
    if ev is None:
        return None
    from dataflex.features import sample_hashes

    if getattr(selector, "subtask_column", None) is None:
        return sha256_json(sample_hashes(ev))
    return sha256_json({"samples": sample_hashes(ev), "subtasks": selector.subtasks})  # the split changes the max


@distributable
def train_segment(
    cfg: Any,
    pool: Any,
    eval_sets: Any,
    round_k: int,
    previous: dict[str, Any] | None = None,
    selection: dict[str, Any] | None = None,
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train round `round_k` on `selection` (and any warm-up data of flex epochs starting inside it). The last
    round, or the round early stopping ended, also saves the trained adapter / model and carries the run's summary;
    the rounds after an early stop carry that state unchanged."""
    if previous is not None and previous.get("stopped"):
        return {**previous, "round": round_k}
    mode = SelectMode(cfg, len(pool))
    run = Run(
        cfg, pool, mode, eval_sets=eval_sets, resume=previous and previous["checkpoint"], metrics_sink=metrics_sink
    )
    start, end = mode.schedule.round_range(round_k)
    # A save_steps checkpoint inside the round resumes there: its plan already holds the active subset.
    if not start <= run.global_step < end:
        raise ConfigError(
            f"round {round_k} covers steps [{start}, {end}) but its input state is at step {run.global_step}"
        )
    if selection is not None:
        run.callbacks["selector"].load_state_dict(selection.get("selector_state") or {})
        run.trainer.plan.add_segment(selection["step"], selection["end"], selection["indices"])
    mode.add_warmups(run, start, end)
    result = run.train(until_step=end)
    state = {
        "round": round_k,
        "step": result.global_step,
        "checkpoint": str(run.save_state()),
        "last_train_loss": result.final_train_loss,
        "stopped": run.trainer.stopping(),
    }
    if end >= mode.schedule.max_steps or state["stopped"]:
        state["summary"] = run.finish(result, last_checkpoint=state["checkpoint"]).to_summary()
    return state


@distributable
def compute_features(cfg: Any, pool: Any, eval_sets: Any, previous: dict[str, Any]) -> dict[str, Any]:
    """What the selector needs for round previous+1, from the model and optimizer at that point (cached by the
    selector); with num_processes > 1 computed by that many workers, each on a share of the pool."""
    if previous.get("stopped"):
        return {"features": {}}
    mode = SelectMode(cfg, len(pool))
    run = Run(cfg, pool, mode, eval_sets=eval_sets, resume=previous["checkpoint"])
    return _features(mode, run, previous)


def _features(mode: SelectMode, run: Run, previous: Mapping[str, Any]) -> dict[str, Any]:
    event = mode.schedule.selections[previous["round"]]
    selector = run.callbacks["selector"]
    feats = selector.compute_features(
        run.model, event.step, optimizer=run.trainer.optimizer, base_model_id=run.base_id, tokenizer=run.tokenizer
    )
    return {"step": event.step, "selector": mode.component, "features": feats}


def select_round(
    cfg: Any, pool: Any, eval_sets: Any, previous: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The selector's features and choice for round previous+1 (one set-up of model and selector for both).

    The selection is written to OUTPUT_DIR/selections/step_<g>.json and reused when the same model state, data,
    selector config and step come again. With num_processes > 1, features are computed on the workers."""
    if previous.get("stopped"):  # early stopping ended the run: no more selections
        return {"features": {}}, {"step": previous["step"], "skipped": True}
    mode = SelectMode(cfg, len(pool))
    has_features = hasattr(REGISTRY.get("selector", component_for(cfg.dataflex, "selector")[0]), "compute_features")
    launched = has_features and cfg.train.num_processes > 1
    feats = compute_features(cfg, pool, eval_sets, previous) if launched else None
    run = Run(cfg, pool, mode, eval_sets=eval_sets, resume=previous["checkpoint"])
    if feats is None:
        # Computing features must not change the selection: the selector state and RNG streams are put back.
        restored, rng = run.callbacks["selector"].state_dict(), capture_rng()
        feats = _features(mode, run, previous) if has_features else {"features": {}}
        run.callbacks["selector"].load_state_dict(restored)
        restore_rng(*rng)
    return feats, _selection(mode, run, previous, feats)


def _selection(mode: SelectMode, run: Run, previous: Mapping[str, Any], features: Mapping[str, Any]) -> dict:
    event = mode.schedule.selections[previous["round"]]
    selector, pool = run.callbacks["selector"], run.pool
    k = mode.num_samples(event)
    key = mode.selection_key(run, event, previous["checkpoint"])
    path = Path(run.args.output_dir) / "selections" / f"step_{event.step}.json"
    cached = _read(path)
    if cached is not None and cached.get("key") == key:
        logger.info("selection at step %d: cache hit %s", event.step, path)
        return {**cached, "cache": "hit"}
    selector.last_metric = {}
    # The flex epoch of this selection (a selector's exclude_selected memory is per flex epoch).
    selector.run_seed, selector.flex_epoch = int(run.args.seed), event.flex_epoch
    indices = selector.select(
        run.model,
        event.step,
        k,
        features=features.get("features") or None,
        optimizer=run.trainer.optimizer,
        optimizer_state=run.trainer.optimizer.state,
        scheduler_state=run.trainer.scheduler.state_dict(),
        current_update_times=event.current,
        update_times=event.update_times,
        tokenizer=run.tokenizer,
        base_model_id=run.base_id,
    )
    indices = check_indices(indices, k, len(pool), f"selector '{mode.component}' at step {event.step}")
    names = domain_names(pool)
    dom = pool["domain_id"]
    counts = Counter(names[dom[i]] for i in indices)
    out = {
        "step": event.step,
        "end": event.end,
        "indices": indices,
        "metric": getattr(selector, "last_metric", {}),
        "domain_counts": {n: counts.get(n, 0) for n in names},
        "selector": mode.component,
        "key": key,
        "selector_state": selector.state_dict(),
        "current_update_times": event.current,
        "update_times": event.update_times,
    }
    atomic_write_json(path, out)
    composition = ", ".join(f"{n}={c}" for n, c in out["domain_counts"].items() if c)
    logger.info("selection at step %d (%s): %s", event.step, mode.component, composition)
    return {**out, "cache": "miss"}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finalize(last: Mapping[str, Any], selections: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's summary (from the last round) with the per-round selection composition (`selection_history`)."""
    composition = [
        {"step": s["step"], "domain_counts": s["domain_counts"], "cache": s.get("cache")}
        for s in selections
        if not s.get("skipped")
    ]
    return {**last["summary"], "selection_history": composition}


def run_all(cfg: Any, pool: Any, eval_sets: Any, metrics_sink: MetricsSink | None = None) -> dict[str, Any]:
    """Every round in order (what the Kedro pipeline unrolls), for use without Kedro."""
    n = select_schedule(cfg.dataflex, cfg.train, len(pool)).num_rounds
    state = train_segment(cfg, pool, eval_sets, 0, metrics_sink=metrics_sink)
    selections = []
    for k in range(1, n):
        if state.get("stopped"):
            break
        _, sel = select_round(cfg, pool, eval_sets, state)
        selections.append(sel)
        state = train_segment(cfg, pool, eval_sets, k, state, sel, metrics_sink)
    return finalize(state, selections)
