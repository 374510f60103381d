"""The comparison's library: the arm x seed cells of a `compare` config (checked before any work), one cell run
through the modes' own library functions, and the leaderboard built from the cells' run_summary.json files.

A cell's config is the run's own parameters with the arm's overrides, its seed and the budget on top; it writes
everything under `<output_dir>/compare/<arm>/seed-<s>/` and finishes with `run_summary.json` there, which is what
makes a re-run skip it (resume) and what the leaderboard reads. Content-keyed caches (tokenisation, the LESS
warm-up, the gradient datastore, selector caches) live outside the cells and are shared by all of them.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dataflex.core.errors import ConfigError, DataFlexError
from dataflex.utils.logging import logger

# What an arm may run: a train_type (through `train_type:`) or a recipe pipeline (through `pipeline:`).
MODES = ("static", "dynamic_select", "dynamic_mix", "dynamic_weight")
RECIPES = ("less", "doremi", "static_select")
KIND = {"dynamic_select": "selector", "dynamic_mix": "mixer", "dynamic_weight": "weighter"}
LOWER_IS_BETTER = {"loss": True, "perplexity": True, "accuracy": False}


@dataclass(frozen=True)
class Cell:
    """One arm x seed: its name, which pipeline runs it, its full grouped parameters and its own output folder."""

    arm: str
    seed: int
    pipeline: str
    params: dict[str, Any]
    output_dir: str
    # The train.seed of the arm's feature stage (LESS / static_select warm-up, datastore, targets): the comparison's
    # first seed for every cell, so those caches are computed once for all seeds; the seeds vary the training.
    feature_seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


def cell_names(params: Mapping[str, Any] | None) -> list[tuple[str, int]]:
    """(arm, seed) of every cell, read leniently (for the pipeline's shape: never raises; the run's checks do)."""
    group = (params or {}).get("compare") or {}
    arms = [a["name"] for a in group.get("arms") or [] if isinstance(a, Mapping) and isinstance(a.get("name"), str)]
    seeds = [s for s in group.get("seeds") or [0] if isinstance(s, int) and not isinstance(s, bool)]
    return [(a, s) for a in dict.fromkeys(arms) for s in dict.fromkeys(seeds)]


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def arm_params(base: Mapping[str, Any], arm: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(pipeline, grouped parameters) of one arm: grouped overrides (`{dataflex: {...}}`) first, then flat keys
    (`component_name: random`), both over the run's own parameters."""
    from dataflex.config import GROUPS, RunConfig, flat_to_grouped

    name = arm["name"]
    rest = {k: v for k, v in arm.items() if k not in ("name", "pipeline")}
    grouped = {k: v for k, v in rest.items() if k in GROUPS and isinstance(v, Mapping)}
    if "compare" in grouped:
        raise ConfigError(f"compare arm {name!r}: an arm cannot set the compare group itself")
    flat = {k: v for k, v in rest.items() if k not in grouped}
    full = RunConfig.from_params(base).to_params()  # every group, defaults filled in (a partial base is fine)
    params = _merge({k: v for k, v in full.items() if k != "compare"}, grouped)
    try:
        params = flat_to_grouped(flat, base=params) if flat else params
    except ConfigError as exc:
        raise ConfigError(f"compare arm {name!r}: {exc}") from None
    pipeline = arm.get("pipeline")
    train_type = (params.get("dataflex") or {}).get("train_type", "static")
    if pipeline is None:
        pipeline = train_type
    if pipeline not in MODES + RECIPES:
        raise ConfigError(
            f"compare arm {name!r}: unknown mode or pipeline {pipeline!r}; valid: {', '.join(MODES + RECIPES)}"
        )
    if pipeline in RECIPES and train_type != "static":
        raise ConfigError(f"compare arm {name!r}: pipeline {pipeline} runs its own recipe; drop train_type")
    return pipeline, params


def plan_cells(params: Mapping[str, Any], check_paths: bool = True) -> list[Cell]:
    """Every arm x seed cell of the run's `compare` group, each checked as the run it will be (unknown component
    or mode, a different base model or pool, a budget the arm cannot meet): one ConfigError line, before any
    training."""
    from dataflex.config import PIPELINE_GROUPS, RunConfig, validate

    cfg = RunConfig.from_params(params)
    cmp = cfg.compare
    if not cmp.arms:
        raise ConfigError("compare.arms is empty: name at least one arm (docs/modes/compare.md)")
    if cmp.budget_steps < 1:
        raise ConfigError("compare.budget_steps must be set (> 0): every arm trains that many optimizer steps")
    names = [a["name"] for a in cmp.arms]
    if cmp.baseline is not None and cmp.baseline not in names:
        raise ConfigError(f"compare.baseline {cmp.baseline!r} is not an arm; arms: {', '.join(names)}")
    root = Path(cfg.train.output_dir) / "compare"
    base_id = None
    cells = []
    for arm in cmp.arms:
        pipeline, arm_p = arm_params(params, arm)
        label = f"compare arm {arm['name']!r}"
        budget = {"train": {"max_steps": cmp.budget_steps, "overwrite_output_dir": True}}
        if pipeline.startswith("dynamic_") or pipeline == "doremi":
            budget["dataflex"] = {"train_step": cmp.budget_steps}
        arm_p = _merge(arm_p, budget)
        try:
            arm_cfg = RunConfig.from_params(arm_p)
            groups = [pipeline] if pipeline in PIPELINE_GROUPS else []
            # The budget before the modes' own checks: they would name train_step, here the comparison's budget.
            _check_component(arm_cfg, pipeline)
            _check_budget(arm_cfg, pipeline, cmp.budget_steps)
            validate(arm_cfg, check_paths=check_paths, pipelines=groups)
        except DataFlexError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        ident = (arm_cfg.model.model_name_or_path, _names(arm_cfg.data.dataset), arm_cfg.data.max_samples)
        if base_id is None:
            base_id = (arm["name"], ident)
        elif ident != base_id[1] and not cmp.allow_different_base:
            raise ConfigError(
                f"{label} trains a different base model or pool than arm {base_id[0]!r} ({_diff(base_id[1], ident)}): "
                "not comparable; set compare.allow_different_base: true to compare them anyway"
            )
        for seed in cmp.seeds:
            out = root / arm["name"] / f"seed-{seed}"
            # Every arm's (final) training runs exactly the budget's optimizer steps; epochs no longer decide it.
            cell_p = _merge(arm_p, {"train": {"seed": int(seed), "output_dir": str(out)}})
            cells.append(Cell(arm["name"], int(seed), pipeline, cell_p, str(out), int(cmp.seeds[0])))
    return cells


def _names(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return tuple(str(v).strip() for v in items)


def _diff(a: tuple, b: tuple) -> str:
    labels = ("model", "dataset", "max_samples")
    return "; ".join(f"{n}: {x} vs {y}" for n, x, y in zip(labels, a, b) if x != y)


def _check_component(cfg: Any, pipeline: str) -> None:
    from dataflex.core.registry import REGISTRY
    from dataflex.train.modes import component_for

    if pipeline in KIND and not (pipeline == "dynamic_mix" and cfg.dataflex.static_mix):
        component_for(replace(cfg.dataflex, train_type=pipeline), KIND[pipeline])
    if pipeline == "static_select":
        import dataflex.train.selector  # noqa: F401  (registers the built-in selectors)

        REGISTRY.check("selector", cfg.static_select.selector, cfg.static_select.params)


def _check_budget(cfg: Any, pipeline: str, budget: int) -> None:
    """The budget is a number of optimizer steps of the arm's training run; an arm whose schedule cannot run
    exactly that many, or whose component would never act within it, is refused with the reason."""
    from dataflex.train.schedule import mix_schedule, select_schedule

    flex = replace(cfg.dataflex, train_step=budget)
    train = replace(cfg.train, max_steps=budget)
    if pipeline == "dynamic_select":
        sched = select_schedule(flex, train, None)
        if not sched.selections:
            raise ConfigError(
                f"warmup_step {flex.warmup_step} leaves no selection within budget_steps={budget}: the selector "
                "would never act; lower warmup_step or raise the budget"
            )
    elif pipeline == "dynamic_mix" and not flex.static_mix:
        total = mix_schedule(flex, train, None).max_steps
        if total != budget:
            raise ConfigError(
                f"dynamic_mix runs warmup_step + update_step x update_times = {total} steps, not budget_steps="
                f"{budget}; set update_times: 0 (the mixer updates until the budget) or make them add up to it"
            )
    elif pipeline == "dynamic_weight" and flex.warmup_step >= budget:
        raise ConfigError(
            f"warmup_step {flex.warmup_step} >= budget_steps={budget}: the weighter would never act; lower it"
        )


# ----------------------------------------------------------------------------- one cell


def done(cell: Cell) -> dict[str, Any] | None:
    """The cell's run_summary.json when it finished before (a resumed comparison skips it), else None."""
    path = Path(cell.output_dir) / "run_summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # half-written by a killed run (atomic writes make this rare): run it again
        return None


def run_cell(cell: Cell, pool: Any, eval_sets: Any, metrics_sink: Any = None) -> dict[str, Any]:
    """Train and evaluate one cell through the modes' library functions; its summary (also written to
    `<cell>/run_summary.json`, the last file a cell writes)."""
    import shutil

    from dataflex.config import RunConfig

    out = Path(cell.output_dir)
    if out.exists():
        shutil.rmtree(out)  # what a killed attempt left: a cell restarts whole (its caches are outside it)
    cfg = RunConfig.from_params(cell.params)
    started = time.perf_counter()
    result, feature_seconds, extra = _train(cell, cfg, pool, eval_sets, metrics_sink)
    trained = time.perf_counter()
    metrics = _evaluate(cfg, result, eval_sets)
    wall = time.perf_counter() - started
    from dataflex.reporting import run_summary
    from dataflex.tracking import active_run_id

    summary = {
        **run_summary(result, metrics, component_name=cfg.dataflex.component_name, mlflow_run_id=active_run_id()),
        "arm": cell.arm,
        "seed": cell.seed,
        "pipeline": cell.pipeline,
        "budget_steps": cfg.train.max_steps,
        "wall_seconds": wall,
        "feature_seconds": feature_seconds,
        "train_seconds": trained - started - feature_seconds,
        "eval_seconds": wall - (trained - started),
        **extra,
    }
    from dataflex.utils.io import atomic_write_json

    atomic_write_json(out / "run_summary.json", summary)
    return summary


def _train(cell: Cell, cfg: Any, pool: Any, eval_sets: Any, sink: Any) -> tuple[dict[str, Any], float, dict]:
    """(train result, seconds spent on features / selection / proxies outside the budgeted training, extras)."""
    from dataflex.train import run

    p = cell.pipeline
    if p in ("static", "dynamic_weight"):
        return run.train(cfg, pool, p, eval_sets=eval_sets, metrics_sink=sink), 0.0, {}
    if p == "dynamic_select":
        from dataflex.train.modes import select

        cfg = replace(cfg, dataflex=replace(cfg.dataflex, train_type=p))
        res = select.run_all(cfg, pool, eval_sets, metrics_sink=sink)
        counts = _sum_counts(h["domain_counts"] for h in res.get("selection_history") or [])
        return res, float(res.get("select_seconds") or 0.0), {"selection_composition": counts}
    if p == "dynamic_mix":
        from dataflex.train.modes import mix

        cfg = replace(cfg, dataflex=replace(cfg.dataflex, train_type=p))
        res = mix.run_all(cfg, pool, metrics_sink=sink, mixer_eval_sets=_mixer_sets(cfg))
        return res, 0.0, {"mixture_history": res.get("mixture_history") or []}
    # The feature stage runs at the comparison's first seed whatever the cell's (shared caches, see Cell).
    feat = replace(cfg, train=replace(cfg.train, seed=cell.feature_seed))
    if p == "less":
        return _less(cfg, feat, pool, sink)
    if p == "static_select":
        return _static_select(cfg, feat, pool, sink)
    return _doremi(cell, pool, sink)


def _sum_counts(items: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in items:
        for k, v in counts.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _mixer_sets(cfg: Any) -> Any:
    if cfg.dataflex.mixer_eval_dataset is None:
        return None
    from dataflex.data.pools import build_mixer_eval_sets
    from dataflex.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.model_name_or_path)
    return build_mixer_eval_sets(cfg.data, cfg.dataflex.mixer_eval_dataset, tokenizer, seed=cfg.train.seed)


def _train_on(cfg: Any, pool: Any, selection: Mapping[str, Any], train_type: str, sink: Any) -> dict[str, Any]:
    """A fresh model trained `budget` steps on the selection (the recipes' own final training runs epochs)."""
    from dataflex.train.modes.less import selected_indices
    from dataflex.train.run import train

    indices = selected_indices(selection)
    extra = {"train_type": train_type, "selected_samples": len(indices), "targets": list(selection["targets"])}
    return train(cfg, pool.select(indices), summary_extra=extra, metrics_sink=sink)


def _composition(selection: Mapping[str, Any]) -> dict[str, int]:
    return _sum_counts(t.get("domain_counts") or {} for t in selection["targets"].values())


def _less(cfg: Any, feat: Any, pool: Any, sink: Any) -> tuple[dict[str, Any], float, dict]:
    from dataflex.models import load_tokenizer
    from dataflex.train.modes import less as lib

    start = time.perf_counter()
    less = cfg.less
    warm = lib.warmup(feat, pool, less.warmup_percentage, less.warmup_epochs, less.warmup_dir)
    targets = lib.build_targets(cfg.data, less.targets, load_tokenizer(cfg.model.model_name_or_path), feat.train.seed)
    local = replace(feat, train=replace(feat.train, num_processes=1))
    train_refs, target_refs, hits = [], [], 0
    for k in range(len(warm["checkpoints"])):
        train_refs.append(lib.checkpoint_features(feat, pool, warm, k, "train", "pool", progress=False))
        target_refs.append(
            {t: lib.checkpoint_features(local, targets[t], warm, k, "target", t, progress=False) for t in targets}
        )
        hits += int(train_refs[-1]["status"] == "hit")
    selection = lib.select(pool, targets, warm, train_refs, target_refs, less, cfg.data)
    seconds = time.perf_counter() - start
    caches = {"warmup_cache": warm["cache"], "datastore_hits": hits, "datastore_checkpoints": len(train_refs)}
    logger.info("compare: LESS warm-up cache %s, datastore hits %d/%d", warm["cache"], hits, len(train_refs))
    result = _train_on(cfg, pool, selection, "less", sink)
    return result, seconds, {"selection_composition": _composition(selection), "caches": caches}


def _static_select(cfg: Any, feat: Any, pool: Any, sink: Any) -> tuple[dict[str, Any], float, dict]:
    from dataflex.models import load_tokenizer
    from dataflex.train.modes import less as less_lib
    from dataflex.train.modes import static_select as lib

    start = time.perf_counter()
    ss = cfg.static_select
    targets = less_lib.build_targets(
        cfg.data, ss.targets, load_tokenizer(cfg.model.model_name_or_path), seed=feat.train.seed
    )
    warm = lib.warmup(feat, pool)
    feats = lib.compute_features(feat, pool, targets, warm)
    selection = lib.select(feat, pool, targets, warm, feats)
    seconds = time.perf_counter() - start
    result = {**_train_on(cfg, pool, selection, "static_select", sink), "selector": selection["selector"]}
    return result, seconds, {"selection_composition": _composition(selection)}


def _doremi(cell: Cell, pool: Any, sink: Any) -> tuple[dict[str, Any], float, dict]:
    # The doremi pipeline's own steps (reference -> proxy -> final), on the cell's parameters; only the final run
    # is the budgeted training, reference and proxy are the arm's "feature" cost.
    from dataflex.pipelines.doremi import nodes

    start = time.perf_counter()
    ref = nodes.reference(pool, cell.params)
    proxy, _ = nodes.proxy(pool, cell.params, ref)
    seconds = time.perf_counter() - start
    result, history = nodes.final(pool, cell.params, proxy)
    return result, seconds, {"mixture_history": history}


def _evaluate(cfg: Any, result: Mapping[str, Any], eval_sets: Any) -> dict[str, Any]:
    """The evaluation pipeline's own node on the cell's trained adapter / model."""
    from dataflex.pipelines.evaluation.nodes import evaluate, trained_model

    return evaluate(trained_model(dict(result)), eval_sets, cfg.to_params())


# ----------------------------------------------------------------------------- the leaderboard

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency); 30+ uses the normal's.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t95(df: int) -> float:
    if df in _T95:
        return _T95[df]
    return 2.0 + 2.4 / df if df < 30 else 1.96  # within 0.5% of the exact quantile for 10 < df < 30


def cell_metric(summary: Mapping[str, Any], metric: str) -> dict[str, float]:
    """The metric per eval set of one cell (sets without it, e.g. accuracy of a pt set, are left out)."""
    return {name: float(m[metric]) for name, m in (summary.get("eval") or {}).items() if metric in m}


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def leaderboard(summaries: list[Mapping[str, Any]], metric: str, baseline: str | None) -> list[dict[str, Any]]:
    """One row per arm: the metric's mean and std over seeds per eval set and averaged over the sets (`score`,
    what the rank is by), times, and the paired difference of `score` vs the baseline arm (same seeds) with a
    95% t interval (n = paired seeds)."""
    arms = list(dict.fromkeys(s["arm"] for s in summaries))
    baseline = baseline or arms[0]
    by = {(s["arm"], s["seed"]): s for s in summaries}
    sets = list(dict.fromkeys(n for s in summaries for n in cell_metric(s, metric)))

    def score(s: Mapping[str, Any]) -> float:
        values = list(cell_metric(s, metric).values())
        return statistics.fmean(values) if values else math.nan

    rows = []
    for arm in arms:
        cells = [s for s in summaries if s["arm"] == arm]
        row: dict[str, Any] = {"arm": arm, "pipeline": cells[0].get("pipeline"), "seeds": len(cells)}
        row["score_mean"], row["score_std"] = mean_std([score(c) for c in cells])
        for name in sets:
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(
                [cell_metric(c, metric)[name] for c in cells if name in cell_metric(c, metric)]
            )
        for t in ("wall_seconds", "feature_seconds", "train_seconds"):
            row[t] = statistics.fmean(float(c.get(t) or 0.0) for c in cells)
        diffs = [score(c) - score(by[(baseline, c["seed"])]) for c in cells if (baseline, c["seed"]) in by]
        mean, std = mean_std(diffs)
        half = t95(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        row.update({"diff_vs_baseline": mean, "diff_ci_low": mean - half, "diff_ci_high": mean + half})
        rows.append(row)
    sign = 1.0 if LOWER_IS_BETTER[metric] else -1.0
    order = sorted(rows, key=lambda r: (math.isnan(r["score_mean"]), sign * r["score_mean"]))
    for rank, row in enumerate(order, 1):
        row["rank"] = rank
    return [{"rank": r["rank"], **{k: v for k, v in r.items() if k != "rank"}} for r in order]


def to_csv(rows: list[Mapping[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(buf, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: _fmt(r.get(k), 8) for k in fields} for r in rows])
    return buf.getvalue()


def _fmt(v: Any, digits: int = 4) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}g}"
    return v


def to_markdown(rows: list[Mapping[str, Any]], metric: str, baseline: str | None, budget: int) -> str:
    """The leaderboard as a markdown table: mean ± std per eval set, times, and the paired difference."""
    if not rows:
        return "no cells\n"
    baseline = baseline or next(r["arm"] for r in rows if r["diff_vs_baseline"] == 0.0)
    sets = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean") and k != "score_mean"]
    better = "lower" if LOWER_IS_BETTER[metric] else "higher"
    head = ["rank", "arm", f"mean {metric}", *sets, "wall s", "feature s", f"diff vs {baseline} (95% CI)"]
    lines = [
        f"# compare: {metric} ({better} is better), {budget} optimizer steps per arm, {rows[0]['seeds']} seed(s)\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r["rank"]), r["arm"], _pm(r["score_mean"], r["score_std"])]
        cells += [_pm(r[f"{s}_mean"], r[f"{s}_std"]) for s in sets]
        cells += [f"{r['wall_seconds']:.1f}", f"{r['feature_seconds']:.1f}"]
        if r["arm"] == baseline:
            cells.append("baseline")
        else:
            ci = "" if math.isnan(r["diff_ci_low"]) else f" [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]"
            cells.append(f"{r['diff_vs_baseline']:+.4f}{ci}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def cells_csv(summaries: list[Mapping[str, Any]], metric: str) -> str:
    """Every cell: arm, seed, the metric per eval set (as in its run_summary.json), steps and times."""
    rows = []
    for s in summaries:
        row = {"arm": s["arm"], "seed": s["seed"], "pipeline": s.get("pipeline"), "global_step": s.get("global_step")}
        row.update({f"{n}_{metric}": v for n, v in cell_metric(s, metric).items()})
        row.update({t: s.get(t) for t in ("wall_seconds", "feature_seconds", "train_seconds", "output_dir")})
        rows.append(row)
    return to_csv(rows)
