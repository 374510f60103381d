"""Reports: the metrics table, the loss curve and run_summary.json (the output contract)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# No backend is forced here: a notebook shows these figures inline; a pipeline run (dataflex.hooks) picks Agg.
import matplotlib.pyplot as plt


def metrics_table(eval_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: one row per eval set."""
    lines = ["| eval set | loss | perplexity | accuracy | samples |", "|---|---|---|---|---|"]
    for name, m in eval_metrics.items():
        acc = f"{m['accuracy']:.3f}" if "accuracy" in m else "–"
        lines.append(f"| {name} | {m['loss']:.4f} | {m['perplexity']:.2f} | {acc} | {m['num_samples']} |")
    return "\n".join(lines) + "\n"


def loss_curve(log_history: list[Mapping[str, Any]], title: str = "training loss") -> plt.Figure:
    """Train loss per logging step, with per-domain train losses when there are several domains."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in log_history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in log_history if "loss" in h], label="loss", linewidth=2, color="black")
    domains = sorted({k for h in log_history for k in h if k.startswith("train_loss/")})
    if len(domains) > 1:
        for key in domains:
            pts = [(h["step"], h[key]) for h in log_history if key in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key.split("/", 1)[1], linewidth=1, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token-mean cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def weights_plot(log_history: list[Mapping[str, Any]], title: str = "sample weights") -> plt.Figure:
    """Relative weights (mean 1) per logging step: min / max / std, normalised entropy, and mean weight by domain."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    rows = [h for h in log_history if "weights/min" in h]
    steps = [h["step"] for h in rows]
    for key in ("weights/min", "weights/max", "weights/std", "weights/entropy"):
        ax.plot(steps, [h[key] for h in rows], label=key.split("/", 1)[1])
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_title(f"{title}: spread")
    domains = sorted({k for h in rows for k in h if k.startswith("weights/domain/")})
    for key in domains:
        pts = [(h["step"], h[key]) for h in rows if key in h]
        bx.plot([p[0] for p in pts], [p[1] for p in pts], label=key.rsplit("/", 1)[1])
    bx.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    bx.set_title("mean relative weight by domain")
    for a in (ax, bx):
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig


def mixture_plot(history: list[Mapping[str, Any]], total_steps: int) -> plt.Figure:
    """Domain proportions over training: each update holds until the next one (a step plot)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    names = history[0]["names"]
    steps = [h["step"] for h in history] + [total_steps]
    for d, name in enumerate(names):
        values = [h["proportions"][d] for h in history]
        ax.step(steps, values + values[-1:], where="post", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sampling proportion")
    ax.set_ylim(0, 1)
    ax.set_title("mixture proportions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def doremi_plot(log_history: list[Mapping[str, Any]], names: list[str], average: list[float]) -> plt.Figure:
    """DoReMi's domain weights alpha over the proxy run (solid) and their average, the result (dashed)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for d, name in enumerate(names):
        key = f"doremi/alpha/{name}"
        pts = [(h["step"], h[key]) for h in log_history if key in h]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)[0]
        ax.axhline(average[d], color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("proxy optimizer step")
    ax.set_ylabel("domain weight alpha")
    ax.set_title("DoReMi domain weights (dashed: average = the learned mixture)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_summary(
    train_result: Mapping[str, Any],
    eval_metrics: Mapping[str, Any],
    *,
    component_name: str | None,
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    return {
        "train_type": train_result.get("train_type"),
        "component_name": component_name,
        "component": train_result.get("component"),  # its registered name and every parameter it received
        "global_step": train_result.get("global_step"),
        "train_samples_seen": train_result.get("train_samples_seen"),
        "final_train_loss": train_result.get("final_train_loss"),
        "eval": {
            name: {k: m[k] for k in ("loss", "perplexity", "accuracy") if k in m} for name, m in eval_metrics.items()
        },
        "mlflow_run_id": mlflow_run_id,
        "output_dir": train_result.get("output_dir"),
    }


def selection_composition_plot(selection: Mapping[str, Any]) -> plt.Figure:
    """Selected samples per pool domain for each target (LESS), next to the pool's own composition."""
    targets = list(selection["targets"])
    names = selection["domains"]
    pool = selection.get("pool_domain_counts") or {}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) * max(1, len(targets))), 4), dpi=110)
    width = 0.8 / (len(targets) + (1 if pool else 0))
    for t, target in enumerate(targets):
        counts = selection["targets"][target]["domain_counts"]
        total = max(1, sum(counts.values()))
        ax.bar(
            [d + t * width for d in range(len(names))],
            [counts.get(n, 0) / total for n in names],
            width,
            label=f"selected for {target}",
        )
    if pool:
        total = max(1, sum(pool.values()))
        ax.bar(
            [d + len(targets) * width for d in range(len(names))],
            [pool.get(n, 0) / total for n in names],
            width,
            color="lightgrey",
            label="pool",
        )
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction of the selection")
    ax.set_ylim(0, 1)
    ax.set_title("selected-domain composition")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def score_histogram(scores: Mapping[str, list[float]], domains: list[str], cutoffs: Mapping[str, float]) -> plt.Figure:
    """Distribution of each target's scores over the pool, one histogram per pool domain; the dashed line is the
    lowest selected score."""
    targets = list(scores)
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4), dpi=110, squeeze=False)
    names = sorted(set(domains), key=domains.index)
    for ax, target in zip(axes[0], targets):
        values = scores[target]
        for name in names:
            ax.hist([v for v, d in zip(values, domains) if d == name], bins=40, alpha=0.5, label=name)
        ax.axvline(cutoffs[target], color="black", linestyle="--", linewidth=1)
        ax.set_title(f"LESS scores for {target}")
        ax.set_xlabel("score")
        ax.set_ylabel("pool samples")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def selection_rounds_plot(history: list[Mapping[str, Any]], domains: list[str]) -> plt.Figure:
    """Selected-domain composition of each dynamic selection (stacked fractions per selection step)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in history]
    bottom = [0.0] * len(history)
    for name in domains:
        vals = [h["domain_counts"].get(name, 0) / max(1, sum(h["domain_counts"].values())) for h in history]
        ax.bar([str(s) for s in steps], vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("selection at optimizer step")
    ax.set_ylabel("fraction of the selection")
    ax.set_ylim(0, 1)
    ax.set_title("selected-domain composition per round")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def expert_load_heatmaps(names: list[str], panels: list[tuple[int, Any]]) -> plt.Figure:
    """Per-domain expert loads (rows: domains, columns: experts; each row sums to 1), one heat map per
    (step, loads) panel, e.g. the dynamic_moe mixer's first and last update, on one colour scale."""
    import numpy as np

    grids = [np.asarray(loads, dtype=float) for _, loads in panels]
    top = max(float(g.max()) for g in grids)
    width = max(4.0, 0.45 * grids[0].shape[1] + 2.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 0.5 * len(names) + 2.0), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, (step, _), grid in zip(axes, panels, grids):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [str(e) for e in range(grid.shape[1])], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(f"expert load at step {step}")
    fig.colorbar(image, ax=list(axes), label="share of the domain's routed tokens")
    return fig


def compare_metric_plot(rows: list[Mapping[str, Any]], metric: str) -> plt.Figure:
    """A comparison's metric per arm (mean over eval sets, error bars: std over seeds), in leaderboard order."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4), dpi=110)
    arms = [r["arm"] for r in rows]
    ax.bar(arms, [r["score_mean"] for r in rows], yerr=[r["score_std"] for r in rows], capsize=4, color="tab:blue")
    ax.set_ylabel(f"mean {metric} over eval sets")
    ax.set_title(f"{metric} per arm (error bars: std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this comparison", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def compare_mixture_plot(histories: Mapping[str, list[Mapping[str, Any]]]) -> plt.Figure:
    """Mixing arms' domain proportions over training, one panel per arm (one seed's history each)."""
    fig, axes = plt.subplots(1, max(1, len(histories)), figsize=(5 * max(1, len(histories)), 4), dpi=110)
    axes = list(axes) if len(histories) > 1 else [axes]
    if not histories:
        _no_data(axes[0], "mixer arms")
    for ax, (arm, history) in zip(axes, histories.items()):
        names = history[0]["names"]
        steps = [h["step"] for h in history]
        for d, name in enumerate(names):
            ax.step(steps, [h["proportions"][d] for h in history], where="post", label=name)
        ax.set_title(arm)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("sampling proportion")
    fig.tight_layout()
    return fig


def compare_selection_plot(compositions: Mapping[str, Mapping[str, int]]) -> plt.Figure:
    """Selecting arms' selected-domain composition (all selections of all seeds), stacked fractions per arm."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(compositions)), 4), dpi=110)
    if not compositions:
        _no_data(ax, "selector arms")
        return fig
    arms = list(compositions)
    domains = list(dict.fromkeys(d for c in compositions.values() for d in c))
    bottom = [0.0] * len(arms)
    for name in domains:
        vals = [compositions[a].get(name, 0) / max(1, sum(compositions[a].values())) for a in arms]
        ax.bar(arms, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("fraction of the selections")
    ax.set_ylim(0, 1)
    ax.set_title("selected-domain composition per arm")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
