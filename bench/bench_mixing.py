"""Mixing: DoReMi and ODM vs uniform mixing, end to end on the demo text domains.

The pool is the demo's three pre-training text domains (`text_stories_train`, `text_numbers_train` and the much
noisier `text_noisy_train`, random tokens mixed with words; stage `pt`). Every run fine-tunes the demo's tiny model
(`data/01_raw/tiny_llama`, LoRA, the `model` / `train` values of conf/base/parameters.yml, with the batch size and
step count given here) for the same number of optimizer steps, same seed and LoRA init:

1. uniform: static mix at 1/3 each (`mix.run_single_segment`, `static_mix: true`).
2. DoReMi (the pipeline's 3 steps, `mix.doremi_config`): reference = run 1's adapter (a uniform static run, as in
   the paper), proxy = the `doremi` mixer against it (same steps), final = static mix at the proxy's averaged
   domain weights, same steps as uniform.
3. ODM: the `odm` mixer (`single_segment`: it resets the sampling proportions every step after its warmup).

Uniform, DoReMi-final and ODM save a TrainState every `--eval-every` steps; each checkpoint's
`trainable.safetensors` is loaded by parameter name into a fresh LoRA model and evaluated on the three
`<domain>_test` sets (token-mean loss, `dataflex.evaluation.eval_loss`). Reported: per-domain, worst-domain and
average (mean of the three) test loss at equal steps; the DoReMi weights; the average-loss curve and the first
checkpoint at which ODM's average test loss is <= uniform's final one. Checkpoints mid-run are mid-schedule (cosine
LR not yet annealed), as in the ODM paper's single-run curves. This is a benchmark, not a test: it reports
whichever way the numbers go and asserts nothing.

    .venv/bin/python bench/bench_mixing.py --steps 150
    .venv/bin/python bench/bench_mixing.py --steps 150 --out bench/RESULTS.md --plot bench/mixing_loss.png
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

from _common import demo_groups, machine_label, quiet_offline_env, silence_libraries  # noqa: E402

quiet_offline_env()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["text_stories", "text_numbers", "text_noisy"]
NOISY = "text_noisy"

# conf/base/parameters.yml `model` and `train` groups (output dir, batch size, epochs set per run).
MODEL, TRAIN = demo_groups()
# conf/base/parameters.yml `dataflex.components.mixers` entries for doremi (reference set per run) and odm.
DOREMI_PARAMS = {"reweight_eta": 1.0, "reweight_eps": 1e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of every run (uniform, proxy, final, ODM)")
    p.add_argument("--seed", type=int, default=42, help="training seed (LoRA init, sampling)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cutoff-len", type=int, default=64)
    p.add_argument("--odm-warmup", type=int, default=10, help="ODM warmup_steps (uniform sampling before it acts)")
    p.add_argument("--eval-every", type=int, default=25, help="checkpoint + evaluate every N steps")
    p.add_argument("--out", type=Path, default=None, help="append a markdown section to this file (bench/RESULTS.md)")
    p.add_argument("--plot", type=Path, default=None, help="save the average-test-loss-vs-steps plot (PNG) here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.odm_warmup < 0:
        p.error("steps, batch-size, eval-every must be >= 1 and odm-warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------ runs


def flex_base(steps: int) -> dict:
    return {
        "train_type": "dynamic_mix",
        "static_mix": True,
        "init_mixture_proportions": None,
        "train_step": steps,
        "mixture_sample_rule": "mixture",
        "component_name": None,
        "components": {},
        "components_cfg_file": None,
        "user_modules": [],
        "warmup_step": 0,
        "update_step": 0,
        "update_times": 0,
    }


def odm_flex(args: argparse.Namespace) -> dict:
    """ODM in one segment (`mix.run_single_segment`): it resets the sampling proportions inside the loop."""
    odm = {
        "name": "odm",
        "params": {"alpha": 0.9, "warmup_steps": args.odm_warmup, "reward_scale": 15.0, "min_exploration_rate": 0.03},
    }
    return {
        **flex_base(args.steps),
        "static_mix": False,
        "component_name": "odm",
        "components": {"mixers": {"odm": odm}},
    }


def run_config(flex: dict):
    """The typed run config: parameters.yml `model` / `train` and the `dataflex` group `flex` (the train group is
    set per run by `run`)."""
    from dataflex.config import RunConfig

    return RunConfig.from_params({"model": MODEL, "train": TRAIN, "dataflex": flex})


def train_params(args: argparse.Namespace, out: Path, save: bool) -> dict:
    return {
        **TRAIN,
        "output_dir": str(out),
        "per_device_train_batch_size": args.batch_size,
        "seed": args.seed,
        "save_steps": args.eval_every if save else 0,
    }


def run(label: str, pool, cfg, args: argparse.Namespace, work: Path, save: bool) -> dict:
    from dataclasses import replace

    from dataflex.config import TrainingArguments
    from dataflex.train.modes import mix

    t0 = time.perf_counter()
    train = TrainingArguments.from_dict(train_params(args, work / label, save))
    result = mix.run_single_segment(replace(cfg, train=train), pool)
    result["seconds"] = time.perf_counter() - t0
    print(
        f"  {label:<14} {result['global_step']} steps, train loss {result['final_train_loss']:.4f} "
        f"({result['seconds']:.0f}s)",
        flush=True,
    )
    return result


def checkpoints(result: dict) -> list[tuple[int, Path]]:
    from dataflex.train.trainer.state import list_checkpoints

    out = {}
    for c in list_checkpoints(result["output_dir"]):
        out[int(c.name.split("-")[1])] = c
    return sorted(out.items())


class Evaluator:
    """Test loss of a checkpoint's trainable weights, loaded by name into one fresh LoRA model."""

    def __init__(self, tokenizer, eval_sets: dict, seed: int) -> None:
        from dataflex.data import DataCollatorForCausalLM
        from dataflex.train.run import build_model

        self.model = build_model(run_config({}).model, seed=seed)
        self.params = dict(self.model.named_parameters())
        self.collator = DataCollatorForCausalLM(tokenizer)
        self.eval_sets = eval_sets

    def __call__(self, checkpoint: Path) -> dict:
        from safetensors.torch import load_file

        from dataflex.evaluation import eval_loss

        weights = load_file(str(checkpoint / "trainable.safetensors"))
        missing = set(weights) ^ {n for n, p in self.params.items() if p.requires_grad}
        if missing:
            raise RuntimeError(f"checkpoint {checkpoint} does not match the model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, tensor in weights.items():
                self.params[name].copy_(tensor)
            loss = {
                d: eval_loss(self.model, self.eval_sets[d], self.collator, TRAIN["per_device_eval_batch_size"])["loss"]
                for d in DOMAINS
            }
        return {
            "loss": loss,
            "avg": statistics.fmean(loss.values()),
            "worst": max(loss.values()),
            "worst_domain": max(loss, key=loss.get),
        }


def curve(result: dict, evaluate: Evaluator) -> list[dict]:
    rows = []
    for step, ckpt in checkpoints(result):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        manager = state["plan"]["manager"]
        rows.append({"step": step, **evaluate(ckpt), "proportions": manager["proportions"], "drawn": manager["drawn"]})
    return rows


# ------------------------------------------------------------------------------------------------ report


def short(d: str) -> str:
    return d.removeprefix("text_") + ("*" if d == NOISY else "")


def final_table(rows: dict[str, dict], steps: int) -> str:
    base = rows["uniform"]
    head = [
        "run",
        "steps",
        *[f"{short(d)} loss" for d in DOMAINS],
        "worst-domain loss",
        "Δ worst vs uniform",
        "average loss",
        "Δ avg vs uniform",
        "samples drawn",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        same = label == "uniform"
        drawn = r["drawn"]
        frac = " / ".join(f"{x / max(sum(drawn), 1):.2f}" for x in drawn)
        cells = [
            label,
            str(steps),
            *[f"{r['loss'][d]:.4f}" for d in DOMAINS],
            f"{r['worst']:.4f} ({short(r['worst_domain'])})",
            "—" if same else f"{r['worst'] - base['worst']:+.4f}",
            f"{r['avg']:.4f}",
            "—" if same else f"{r['avg'] - base['avg']:+.4f}",
            frac,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(curves: dict[str, list[dict]]) -> str:
    steps = sorted({r["step"] for c in curves.values() for r in c})
    by = {k: {r["step"]: r for r in c} for k, c in curves.items()}
    head = ["step", *[f"{k} avg loss" for k in curves], "ODM proportions (" + " / ".join(map(short, DOMAINS)) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in steps:
        cells = [str(s), *[f"{by[k][s]['avg']:.4f}" if s in by[k] else "—" for k in curves]]
        odm = by.get("ODM", {}).get(s)
        cells.append(" / ".join(f"{p:.2f}" for p in odm["proportions"]) if odm else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_to_reach(curve_rows: list[dict], target: float) -> int | None:
    return next((r["step"] for r in curve_rows if r["avg"] <= target), None)


def save_plot(curves: dict[str, list[dict]], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"uniform": ("tab:blue", "o"), "ODM": ("tab:orange", "s"), "DoReMi-final": ("tab:green", "^")}
    for label, rows in curves.items():
        color, marker = styles.get(label, (None, "x"))
        ax.plot([r["step"] for r in rows], [r["avg"] for r in rows], marker=marker, color=color, label=label)
    ax.axhline(target, color="tab:blue", linestyle=":", linewidth=1, label="uniform final")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("average test loss (3 text domains)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    from dataflex.data import build_dataset
    from dataflex.models import load_tokenizer
    from dataflex.train.modes import mix

    silence_libraries()

    demo = ROOT / "data/01_raw/demo"
    if not Path(MODEL["model_name_or_path"], "config.json").is_file() or not (demo / "dataset_info.json").is_file():
        print("missing the demo model or corpus: run the demo pipeline once (it builds data/01_raw) first")
        return 1
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    tokenizer = load_tokenizer(MODEL["model_name_or_path"])

    def build(names: list[str]):
        return build_dataset(
            dataset=names, dataset_dir=demo, tokenizer=tokenizer, cutoff_len=args.cutoff_len, stage="pt"
        )

    pool = build([f"{d}_train" for d in DOMAINS])
    eval_sets = {d: build([f"{d}_test"]) for d in DOMAINS}
    print(
        f"pool {len(pool)} samples ({', '.join(f'{d}_train' for d in DOMAINS)}); {args.steps} steps x batch "
        f"{args.batch_size} = {args.steps * args.batch_size} samples per run; seed {args.seed}",
        flush=True,
    )
    evaluate = Evaluator(tokenizer, eval_sets, args.seed)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_mixing_") as tmp:
        work = Path(tmp)
        flex = flex_base(args.steps)
        cfg = run_config(flex)
        uniform = run("uniform", pool, mix.doremi_config(cfg, "reference"), args, work, save=True)
        flex_doremi = {**flex, "components": {"mixers": {"doremi": {"name": "doremi", "params": DOREMI_PARAMS}}}}
        proxy = run(
            "doremi-proxy",
            pool,
            mix.doremi_config(run_config(flex_doremi), "proxy", reference_dir=uniform["adapter_dir"]),
            args,
            work,
            save=False,
        )
        weights = proxy["doremi_average_weights"]
        final = run("doremi-final", pool, mix.doremi_config(cfg, "final", weights=weights), args, work, save=True)
        odm = run("odm", pool, run_config(odm_flex(args)), args, work, save=True)
        for label, r in (("uniform", uniform), ("doremi-proxy", proxy), ("doremi-final", final), ("odm", odm)):
            seconds[label] = r["seconds"]
        t_eval = time.perf_counter()
        curves = {
            "uniform": curve(uniform, evaluate),
            "ODM": curve(odm, evaluate),
            "DoReMi-final": curve(final, evaluate),
        }
        seconds["eval"] = time.perf_counter() - t_eval
        proxy_state = json.loads((Path(proxy["last_checkpoint"]) / "trainer_state.json").read_text())
        final_alpha = proxy_state["components"]["mixer"]["alpha"]
    total = time.perf_counter() - t_start

    steps = {r[-1]["step"] for r in curves.values()}
    if steps != {args.steps}:
        print(f"warning: last checkpoints at {sorted(steps)}, not all at {args.steps}: not an equal-steps comparison")
    finals = {"uniform": curves["uniform"][-1], "DoReMi-final": curves["DoReMi-final"][-1], "ODM": curves["ODM"][-1]}
    target = finals["uniform"]["avg"]
    reach = steps_to_reach(curves["ODM"], target)
    reach_u = steps_to_reach(curves["uniform"], target)
    t1 = final_table(finals, args.steps)
    t2 = curve_table(curves)
    wtxt = ", ".join(f"{short(d)} {w:.3f}" for d, w in zip(DOMAINS, weights))
    atxt = ", ".join(f"{short(d)} {a:.3f}" for d, a in zip(DOMAINS, final_alpha))
    doremi_ok = finals["DoReMi-final"]["worst"] <= finals["uniform"]["worst"]
    odm_ok = reach is not None and reach < args.steps
    if reach is not None:
        reach_txt = f"ODM reaches uniform's final average test loss {target:.4f} at step {reach} (uniform: {reach_u})"
    else:
        reach_txt = f"ODM never reaches uniform's final average test loss {target:.4f} within {args.steps} steps"
    claims = (
        f"DoReMi-final worst-domain loss {finals['DoReMi-final']['worst']:.4f} vs uniform "
        f"{finals['uniform']['worst']:.4f}: claim {'holds' if doremi_ok else 'does NOT hold'}. "
        f"{reach_txt}: claim {'holds' if odm_ok else 'does NOT hold'}."
    )
    machine = machine_label()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
    print()
    print(t1)
    print()
    print(t2)
    print(f"\nDoReMi averaged weights (final step's mixture): {wtxt}; proxy's last alpha: {atxt}")
    print(claims)
    print(
        f"machine: {machine}; {versions}; total {total:.0f}s ({timing}; 1-min load average before: {load_before:.2f})"
    )

    cmd = " ".join([".venv/bin/python", "bench/bench_mixing.py", *(argv if argv is not None else sys.argv[1:])])
    if args.plot:
        title = f"demo text domains, tiny_llama LoRA, batch {args.batch_size}, seed {args.seed}"
        save_plot(curves, target, args.plot, title)
        print(f"plot: {args.plot}")
    if args.out:
        date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        plot_ref = ""
        if args.plot:
            try:
                rel = os.path.relpath(args.plot.resolve(), args.out.resolve().parent)
            except ValueError:
                rel = str(args.plot)
            plot_ref = f"\n![average test loss vs steps, uniform / ODM / DoReMi-final]({rel})\n"
        section = [
            "",
            "",
            "# Mixing: DoReMi and ODM vs uniform",
            "",
            f"Run {date}, {machine}, {versions}, total {total:.0f}s ({timing}). Command:",
            "",
            f"    {cmd}",
            "",
            f"Pool: the demo's `text_stories_train`, `text_numbers_train`, `text_noisy_train` (300 samples each; "
            f"`*` = the noisy domain), stage `pt`, cutoff {args.cutoff_len}. Every run: tiny_llama + LoRA "
            f"(parameters.yml `model`/`train`, batch {args.batch_size}), {args.steps} optimizer steps, seed "
            f"{args.seed}. uniform = static mix 1/3 each; DoReMi = reference (the uniform run) -> proxy (`doremi` "
            f"mixer, eta {DOREMI_PARAMS['reweight_eta']}, eps {DOREMI_PARAMS['reweight_eps']}, {args.steps} steps) "
            f"-> final = static mix at the proxy's averaged weights, {args.steps} steps; ODM = `odm` mixer (alpha "
            f"0.9, warmup {args.odm_warmup}, reward_scale 15, min exploration 0.03). Test loss = token-mean loss on "
            "each `<domain>_test` set (64 samples); average = mean over the three domains; samples drawn = share of "
            "training samples per domain (stories / numbers / noisy).",
            "",
            t1,
            "",
            f"DoReMi averaged weights (the final run's mixture): {wtxt}. Proxy's alpha at its last step: {atxt}.",
            "",
            "Average test loss at each checkpoint (mid-run checkpoints are mid-LR-schedule; ODM proportions = its "
            "sampling policy at that step):",
            "",
            t2,
            "",
            plot_ref,
            f"Summary: {claims}",
            "",
        ]
        with args.out.open("a") as f:
            f.write("\n".join(section))
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
