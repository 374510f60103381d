"""Dynamic MoE mixing vs uniform mixing on the demo's instruction domains, at equal steps.

The model is the tiny MoE (`dataflex-cli make-tiny-model --arch moe`: Mixtral-style, 8 experts, top-2, ~8M
parameters), pre-trained on the demo text and then fine-tuned (full, routers frozen as in the paper:
`freeze_gate`) on the demo's six sft domains (`arith`, `reverse`, `sort`, `wordcount`, `facts`, `format`, 300 rows
each) for the same number of optimizer steps, same seed and batch:

1. uniform: a static mix at 1/6 each (`mix.run_single_segment`, `static_mix: true`);
2. dynamic_moe: the `dynamic_moe` mixer (eta 10, c 0.05), warm-up at 1/6 each, then an update every
   `--update` steps; its gate loads are read on each domain's `<domain>_dev` set (`mixer_eval_dataset`, 16 rows).

Per seed the two runs are interleaved (uniform first for the first seed, dynamic_moe first for the next, ...) in
this one process. Reported: each domain's test loss (token-mean loss on `<domain>_test`, 64 rows) of the final
model, the average and worst domain, the difference to uniform, the mixture trajectory and gate-load distances
(Δ) at each update, the samples drawn per domain, and the wall time of each run (dynamic_moe / uniform: the cost
of the gate-load passes). It asserts nothing: it reports whichever way the numbers go.

    .venv/bin/python bench/bench_dynamic_moe.py
    .venv/bin/python bench/bench_dynamic_moe.py --seeds 42 43 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_label, quiet_offline_env, silence_libraries  # noqa: E402

quiet_offline_env()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data/01_raw/demo"
DOMAINS = ["arith", "reverse", "sort", "wordcount", "facts", "format"]
MOE = {"eta": 10.0, "c": 0.05, "collect_steps": 1, "eval_batch_size": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    p.add_argument("--warmup", type=int, default=30, help="dynamic_moe: steps at 1/6 each before the first update")
    p.add_argument("--update", type=int, default=30, help="dynamic_moe: steps between updates")
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrain-steps", type=int, default=300, help="pre-training of the tiny MoE (when built here)")
    p.add_argument("--model", type=Path, default=None, help="an existing tiny MoE dir (default: build one)")
    p.add_argument("--out", type=Path, default=None, help="append a markdown section to this file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup or args.update < 1 or (args.steps - args.warmup) % args.update:
        p.error("need steps > warmup and (steps - warmup) a multiple of update")
    return args


def config(args: argparse.Namespace, model_dir: Path, out: Path, seed: int, dynamic: bool):
    from dataflex.config import DEFAULTS, RunConfig

    model = {**DEFAULTS["model"], "model_name_or_path": str(model_dir), "finetuning_type": "full", "freeze_gate": True}
    train = {
        **DEFAULTS["train"],
        "output_dir": str(out),
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "logging_steps": 10,
        "seed": seed,
        "progress_bar": False,
    }
    flex = {**DEFAULTS["dataflex"], "train_type": "dynamic_mix", "mixture_sample_rule": "mixture"}
    if dynamic:
        flex |= {
            "component_name": "dynamic_moe",
            "components": {"mixers": {"dynamic_moe": {"name": "dynamic_moe", "params": MOE}}},
            "warmup_step": args.warmup,
            "update_step": args.update,
            "update_times": (args.steps - args.warmup) // args.update,
            "mixer_eval_dataset": [f"{d}_dev" for d in DOMAINS],
        }
    else:
        flex |= {"static_mix": True, "train_step": args.steps}
    return RunConfig.from_params({"model": model, "train": train, "dataflex": flex})


def test_losses(model_dir: Path, tests: dict, collator) -> dict[str, float]:
    from dataflex.evaluation import eval_loss
    from dataflex.models import load_model

    model = load_model(str(model_dir), finetuning_type="full", is_trainable=False, device="cpu")
    with torch.no_grad():
        return {d: eval_loss(model, tests[d], collator, 32)["loss"] for d in DOMAINS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    from dataflex.data import DataCollatorForCausalLM, build_dataset
    from dataflex.models import load_tokenizer
    from dataflex.train.modes import mix
    from dataflex.train.tiny_model import make_tiny_model

    silence_libraries()
    if not (DEMO / "dataset_info.json").is_file():
        print("missing the demo corpus: run `dataflex-cli make-demo-data --output data/01_raw/demo` first")
        return 1
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    seconds: dict[str, list[float]] = {"uniform": [], "dynamic_moe": []}
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_dynamic_moe_") as tmp:
        work = Path(tmp)
        model_dir = args.model
        t0 = time.perf_counter()
        if model_dir is None:
            model_dir = make_tiny_model(
                work / "tiny_moe", DEMO, arch="moe", pretrain_steps=args.pretrain_steps, progress_bar=False
            )
        build_s = time.perf_counter() - t0
        tokenizer = load_tokenizer(str(model_dir))
        collator = DataCollatorForCausalLM(tokenizer)

        def build(names: list[str]):
            return build_dataset(
                dataset=names, dataset_dir=DEMO, tokenizer=tokenizer, cutoff_len=args.cutoff_len, stage="sft"
            )

        pool = build([f"{d}_train" for d in DOMAINS])
        dev = {f"{d}_dev": build([f"{d}_dev"]) for d in DOMAINS}
        tests = {d: build([f"{d}_test"]) for d in DOMAINS}
        print(f"pool {len(pool)} rows, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}", flush=True)
        for i, seed in enumerate(args.seeds):
            order = ["uniform", "dynamic_moe"] if i % 2 == 0 else ["dynamic_moe", "uniform"]
            results[seed] = {}
            for label in order:
                out = work / f"{label}_{seed}"
                cfg = config(args, model_dir, out, seed, label == "dynamic_moe")
                t0 = time.perf_counter()
                if label == "uniform":
                    result = mix.run_single_segment(cfg, pool)
                else:
                    result = mix.run_all(cfg, pool, mixer_eval_sets=dev)
                seconds[label].append(time.perf_counter() - t0)
                state = json.loads((Path(result["last_checkpoint"]) / "trainer_state.json").read_text())
                drawn = state["plan"]["manager"]["drawn"]
                loss = test_losses(out / "model", tests, collator)
                results[seed][label] = {
                    "loss": loss,
                    "avg": statistics.fmean(loss.values()),
                    "worst": max(loss.values()),
                    "drawn": [x / sum(drawn) for x in drawn],
                    "history": result["mixture_history"],
                    "steps": result["global_step"],
                }
                print(
                    f"  seed {seed} {label:<12} {result['global_step']} steps, avg test loss "
                    f"{results[seed][label]['avg']:.4f} ({seconds[label][-1]:.0f}s)",
                    flush=True,
                )
    total = time.perf_counter() - t_start

    short = [d[:5] for d in DOMAINS]
    head = ["seed", "run", *[f"{s} loss" for s in short], "average", "Δ avg vs uniform", "worst", "Δ worst vs uniform"]
    head.append("samples drawn (" + " / ".join(short) + ")")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    deltas = []
    for seed, runs in results.items():
        base = runs["uniform"]
        for label in ("uniform", "dynamic_moe"):
            r = runs[label]
            same = label == "uniform"
            if not same:
                deltas.append((r["avg"] - base["avg"], r["worst"] - base["worst"]))
            lines.append(
                "| "
                + " | ".join(
                    [
                        str(seed),
                        label,
                        *[f"{r['loss'][d]:.4f}" for d in DOMAINS],
                        f"{r['avg']:.4f}",
                        "—" if same else f"{r['avg'] - base['avg']:+.4f}",
                        f"{r['worst']:.4f}",
                        "—" if same else f"{r['worst'] - base['worst']:+.4f}",
                        " / ".join(f"{x:.2f}" for x in r["drawn"]),
                    ]
                )
                + " |"
            )
    t1 = "\n".join(lines)

    traj = ["| seed | step | proportions (" + " / ".join(short) + ") | Δ (gate-load distance) |", "|---|---|---|---|"]
    for seed, runs in results.items():
        for h in runs["dynamic_moe"]["history"]:
            delta = (h.get("stats") or {}).get("delta")
            cells = [
                str(seed),
                str(h["step"]),
                " / ".join(f"{p:.3f}" for p in h["proportions"]),
                " / ".join(f"{x:.4f}" for x in delta) if delta else "— (warm-up)",
            ]
            traj.append("| " + " | ".join(cells) + " |")
    t2 = "\n".join(traj)

    ratio = statistics.median(seconds["dynamic_moe"]) / statistics.median(seconds["uniform"])
    avg_d = statistics.fmean(d[0] for d in deltas)
    worst_d = statistics.fmean(d[1] for d in deltas)
    summary = (
        f"Mean over {len(deltas)} seed(s): Δ average test loss {avg_d:+.4f}, Δ worst-domain test loss {worst_d:+.4f} "
        f"(dynamic_moe − uniform; negative = dynamic_moe better). Wall time dynamic_moe / uniform (median): "
        f"{ratio:.2f} (uniform {statistics.median(seconds['uniform']):.0f}s, dynamic_moe "
        f"{statistics.median(seconds['dynamic_moe']):.0f}s per run)."
    )
    machine = machine_label()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print()
    print(t1)
    print()
    print(t2)
    print()
    print(summary)
    print(f"machine: {machine}; {versions}; total {total:.0f}s (1-min load average before: {load_before:.2f})")
    if args.out:
        cmd = " ".join(
            [".venv/bin/python", "bench/bench_dynamic_moe.py", *(argv if argv is not None else sys.argv[1:])]
        )
        date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        model_txt = (
            f"`{args.model}`"
            if args.model
            else f"built here ({args.pretrain_steps} pre-training steps, {build_s:.0f}s)"
        )
        section = [
            "",
            "",
            "# Dynamic MoE mixing (dynamic_moe) vs uniform",
            "",
            f"Run {date}, {machine}, {versions}, total {total:.0f}s (1-min load average before: {load_before:.2f}). "
            "Command:",
            "",
            f"    {cmd}",
            "",
            f"Model: the tiny MoE (`make-tiny-model --arch moe`, 8 experts, top-2), {model_txt}. Pool: the demo's six "
            f"sft domains, 300 rows each, cutoff {args.cutoff_len}. Every run: full fine-tuning with frozen routers "
            f"(`freeze_gate`), {args.steps} optimizer steps, batch {args.batch_size}, lr {args.lr} cosine. uniform = "
            f"static mix 1/6 each; dynamic_moe = warm-up {args.warmup} steps at 1/6 each, then an update every "
            f"{args.update} steps (eta {MOE['eta']}, c {MOE['c']}), gate loads on each `<domain>_dev` set "
            "(`mixer_eval_dataset`, 16 rows). Per seed the two runs alternate which goes first. Test loss = "
            "token-mean loss of the final model on each `<domain>_test` set (64 rows).",
            "",
            t1,
            "",
            "dynamic_moe's mixture at each update (step 0 = the warm-up's 1/6 each) and the gate-load distances Δ_i "
            "that produced it:",
            "",
            t2,
            "",
            f"Summary: {summary}",
            "",
        ]
        with args.out.open("a") as f:
            f.write("\n".join(section))
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
