"""Loss weighter under label noise: clean-domain test loss of `dynamic_weight` (loss weighter) vs static training.

The demo corpus is generated with `noise_rate` of one domain's TRAIN answers replaced by wrong ones (its dev/test
sets stay clean). Every run then fine-tunes the same tiny model (the demo's `data/01_raw/tiny_llama`, LoRA, the
`model` / `train` values of conf/base/parameters.yml) on the pool of all six `<domain>_train` sets with the same
seed, LoRA init, data order (EpochPlan, reshuffled per epoch from the seed) and number of optimizer steps:
static, then the `loss` weighter once per `--strategies` entry (plain training for `--warmup-step` steps, then
the weighter's per-sample weights). Each trained adapter is evaluated on the six clean `<domain>_test` sets
(token-mean loss; exact match of greedy generation on all 64 samples).

Reported per run: test loss per domain, the mean test loss over the clean domains, the noisy domain's test loss,
exact-match accuracy per domain, and (weighted runs) the mean relative weight (mean 1 over a step) of the noisy
domain's samples vs the clean domains' samples, averaged over the logged `weights/domain/<name>_train` metrics.
Deltas are vs static. This is a benchmark, not a test: it reports whichever way the numbers go and asserts nothing.

    .venv/bin/python bench/bench_weight_noise.py                          # facts, 50% noise, linupper + linear
    .venv/bin/python bench/bench_weight_noise.py --out bench/RESULTS.md   # also append the table to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import demo_groups, machine_label, quiet_offline_env, silence_libraries  # noqa: E402

quiet_offline_env()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["arith", "reverse", "sort", "wordcount", "facts", "format"]
STRATEGIES = ("linupper", "linear", "quadratic", "extremes")

# conf/base/parameters.yml `model` and `train` groups (output dir, batch size, epochs set per run).
MODEL, TRAIN = demo_groups()
EVAL = {"generate": True, "max_new_tokens": 16, "max_generate_samples": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-domain", choices=DOMAINS, default="facts")
    p.add_argument("--noise-rate", type=float, default=0.5, help="fraction of the noisy domain's train answers")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=42, help="training seed (LoRA init, data order)")
    p.add_argument("--strategies", default="linupper,linear", help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--warmup-step", type=int, default=20, help="plain steps before the weighter acts")
    p.add_argument("--delta", type=float, default=1.0)
    p.add_argument("--r", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None, help="append a markdown section to this file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    args.strategy_list = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategy_list if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}; use {', '.join(STRATEGIES)}")
    if not 0.0 <= args.noise_rate <= 1.0 or args.epochs <= 0 or args.warmup_step < 0:
        p.error("noise-rate must be in [0, 1], epochs > 0, warmup-step >= 0")
    return args


# ------------------------------------------------------------------------------------------------ runs


def flex_params(strategy: str | None, args: argparse.Namespace) -> dict:
    if strategy is None:
        return {"train_type": "static"}
    weighter = {"name": "loss", "params": {"strategy": strategy, "delta": args.delta, "r": args.r}}
    return {
        "train_type": "dynamic_weight",
        "component_name": "loss",
        "components": {"weighters": {"loss": weighter}},
        "warmup_step": args.warmup_step,
        "train_step": 0,
        "user_modules": [],
        "components_cfg_file": None,
    }


def domain_weights(log_history: list[dict], noisy: str) -> tuple[float, float, float] | None:
    """(noisy domain, clean domains) mean relative weight over the logged intervals, and their ratio."""
    rows = [h for h in log_history if any(k.startswith("weights/domain/") for k in h)]
    if not rows:
        return None
    noisy_key = f"weights/domain/{noisy}_train"
    w_noisy = statistics.fmean(h[noisy_key] for h in rows if noisy_key in h)
    w_clean = statistics.fmean(
        statistics.fmean(v for k, v in h.items() if k.startswith("weights/domain/") and k != noisy_key) for h in rows
    )
    return w_noisy, w_clean, w_noisy / w_clean


def run_one(label: str, strategy: str | None, pool, eval_sets, tokenizer, args, work: Path) -> dict:
    from dataflex.config import RunConfig
    from dataflex.evaluation import evaluate_sets
    from dataflex.train.run import build_model, train

    params = {**TRAIN, "output_dir": str(work / label), "num_train_epochs": args.epochs, "seed": args.seed}
    cfg = RunConfig.from_params({"model": MODEL, "train": params, "dataflex": flex_params(strategy, args)})
    t0 = time.perf_counter()
    summary = train(cfg, pool, mode=cfg.dataflex.train_type, eval_sets=eval_sets)
    t_train = time.perf_counter() - t0
    model = build_model(cfg.model, seed=args.seed, adapter_path=summary["adapter_dir"])
    metrics = evaluate_sets(
        model, tokenizer, eval_sets, batch_size=TRAIN["per_device_eval_batch_size"], stage="sft", **EVAL
    )
    loss = {d: metrics[f"{d}_test"]["loss"] for d in DOMAINS}
    acc = {d: metrics[f"{d}_test"].get("accuracy", float("nan")) for d in DOMAINS}
    clean = [d for d in DOMAINS if d != args.noise_domain]
    res = {
        "label": label,
        "steps": summary["global_step"],
        "train_loss": summary.get("train_loss_mean", summary.get("train_loss")),
        "loss": loss,
        "acc": acc,
        "clean_loss": statistics.fmean(loss[d] for d in clean),
        "noisy_loss": loss[args.noise_domain],
        "clean_acc": statistics.fmean(acc[d] for d in clean),
        "weights": domain_weights(summary.get("log_history", []), args.noise_domain),
        "seconds": time.perf_counter() - t0,
        "train_seconds": t_train,
    }
    w = res["weights"]
    wtxt = f"  noisy/clean weight {w[2]:.3f}" if w else ""
    print(
        f"  {label:<18} steps={res['steps']}  clean test loss {res['clean_loss']:.4f}  "
        f"{args.noise_domain} test loss {res['noisy_loss']:.4f}{wtxt}  ({res['seconds']:.0f}s)",
        flush=True,
    )
    return res


# ------------------------------------------------------------------------------------------------ report


def tables(results: list[dict], noisy: str) -> str:
    base = results[0]
    short = {d: d[:5] for d in DOMAINS}
    head = (
        ["run", "steps", "clean-mean loss", "Δ vs static", f"{noisy} loss", "Δ vs static"]
        + [f"{short[d]}{'*' if d == noisy else ''} loss" for d in DOMAINS]
        + ["noisy/clean weight"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        same = r is base
        w = r["weights"]
        cells = [
            r["label"],
            str(r["steps"]),
            f"{r['clean_loss']:.4f}",
            "—" if same else f"{r['clean_loss'] - base['clean_loss']:+.4f}",
            f"{r['noisy_loss']:.4f}",
            "—" if same else f"{r['noisy_loss'] - base['noisy_loss']:+.4f}",
            *[f"{r['loss'][d]:.4f}" for d in DOMAINS],
            f"{w[2]:.3f} ({w[0]:.3f} / {w[1]:.3f})" if w else "1 (static)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = ["run", "clean-mean acc", "Δ vs static"] + [f"{short[d]}{'*' if d == noisy else ''} acc" for d in DOMAINS]
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for r in results:
        same = r is base
        cells = [
            r["label"],
            f"{r['clean_acc']:.3f}",
            "—" if same else f"{r['clean_acc'] - base['clean_acc']:+.3f}",
            *[f"{r['acc'][d]:.3f}" for d in DOMAINS],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import datasets
    import transformers

    from dataflex.data import build_dataset, make_demo_data
    from dataflex.models import load_tokenizer

    silence_libraries()

    if not Path(MODEL["model_name_or_path"], "config.json").is_file():
        print(f"missing {MODEL['model_name_or_path']}: build it with `dataflex-cli make-tiny-model --output DIR`")
        return 1
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_weight_noise_") as tmp:
        work = Path(tmp)
        demo = make_demo_data(work / "demo", seed=0, noise_domain=args.noise_domain, noise_rate=args.noise_rate)
        tokenizer = load_tokenizer(MODEL["model_name_or_path"])

        def build(names: list[str]):
            return build_dataset(
                dataset=names, dataset_dir=demo, tokenizer=tokenizer, template="default", cutoff_len=128, stage="sft"
            )

        pool = build([f"{d}_train" for d in DOMAINS])
        eval_sets = datasets.DatasetDict({f"{d}_test": build([f"{d}_test"]) for d in DOMAINS})
        print(
            f"noisy corpus: {args.noise_domain}_train with noise_rate={args.noise_rate}; pool {len(pool)} samples, "
            f"{args.epochs:g} epochs, seed {args.seed}",
            flush=True,
        )
        results.append(run_one("static", None, pool, eval_sets, tokenizer, args, work))
        for s in args.strategy_list:
            results.append(run_one(f"loss/{s}", s, pool, eval_sets, tokenizer, args, work))
    total = time.perf_counter() - t_start

    steps = {r["steps"] for r in results}
    if len(steps) != 1:
        print(f"warning: runs differ in optimizer steps {sorted(steps)}: not an equal-steps comparison")
    table = tables(results, args.noise_domain)
    machine = machine_label()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print()
    print(table)
    print(
        f"\n* = noisy domain; clean-mean = mean over the other {len(DOMAINS) - 1} domains. Deltas vs static "
        f"(negative loss delta = better). noisy/clean weight = mean relative weight of {args.noise_domain}_train "
        "samples / mean over clean domains (logged after warmup)."
    )
    print(f"machine: {machine}; {versions}; total {total:.0f}s (1-min load average before: {load_before:.2f})")

    if args.out:
        date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = " ".join(
            [".venv/bin/python", "bench/bench_weight_noise.py", *(argv if argv is not None else sys.argv[1:])]
        )
        section = [
            "",
            "",
            "# Loss weighter under label noise",
            "",
            f"Run {date}, {machine}, {versions}, total {total:.0f}s. Command:",
            "",
            f"    {cmd}",
            "",
            f"Compared: static training vs the `loss` weighter ({', '.join(args.strategy_list)}; delta={args.delta}, "
            f"r={args.r}, plain training for the first {args.warmup_step} steps) on the demo corpus with "
            f"{args.noise_rate:.0%} of `{args.noise_domain}_train` answers replaced by wrong ones (dev/test clean). "
            f"Same tiny model, LoRA init, seed {args.seed}, data order and number of optimizer steps "
            f"({'/'.join(str(s) for s in sorted(steps))}, {args.epochs:g} epochs) in every run; parameters.yml "
            "`model`/`train` values. Test loss = token-mean loss on each clean `<domain>_test` set (64 samples); acc = "
            "exact match of greedy generation. `*` = noisy domain; clean-mean = mean over the other five domains; "
            "Δ vs static (negative loss Δ = better); noisy/clean weight = mean relative weight (mean 1 per step) of "
            "the noisy domain's samples over that of the clean domains' samples, from the logged "
            "`weights/domain/<name>_train` metrics (after warmup).",
            "",
            table,
            "",
        ]
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n".join(section))
        print(f"appended to {args.out} (add the interpretation by hand)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
