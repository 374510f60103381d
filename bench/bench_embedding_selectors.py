"""One-shot selection on the demo with NEAR, TSDS, ClusterLESS and NICE: timings and the target-domain share.

Not a test. Demo tiny model, the 6-domain pool of 1,800 samples, target arith_dev, budget 5% of the pool (90),
through `dataflex.train.modes.static_select` (what `kedro run --pipelines=static_select` runs): compute_features (miss,
in a fresh cache), compute_features again (all caches hit), select. NEAR / TSDS use the packaged
all-MiniLM-L6-v2; ClusterLESS / NICE use LESS features at the last checkpoint of a 1-epoch warm-up on 5% of the
pool (Adam features; the warm-up is timed separately and shared). Run from the project root after `make demo`:

    .venv/bin/python bench/bench_embedding_selectors.py --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import ROOT, demo_groups, machine_label, quiet_offline_env, silence_libraries

quiet_offline_env()

import torch  # noqa: E402

from dataflex.config import DEFAULTS, RunConfig, check_static_select  # noqa: E402
from dataflex.models import load_tokenizer  # noqa: E402
from dataflex.pipelines.data_processing.nodes import process_data  # noqa: E402
from dataflex.train.modes import static_select as one_shot  # noqa: E402
from dataflex.train.modes.less import build_targets  # noqa: E402

DOMAINS = ["arith", "reverse", "sort", "wordcount", "facts", "format"]
RUNS = [
    ("near", {}, 0),
    ("tsds", {}, 0),
    ("tsds", {"C": 1.0}, 0),
    ("cluster_less", {"n_clusters": 32, "representatives": 4, "proj_dim": 2048}, 1),
    (
        "nice",
        {"policy_model_path": "data/01_raw/tiny_llama", "mc_samples": 4, "max_new_tokens": 8, "proj_dim": 2048},
        1,
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="append the results section to this markdown file")
    args = ap.parse_args()
    silence_libraries()
    torch.set_num_threads(2)
    model, train = demo_groups()
    root = Path(tempfile.mkdtemp(prefix="embedding_selectors_"))
    data = {
        **DEFAULTS["data"],
        "dataset": ",".join(f"{d}_train" for d in DOMAINS),
        "eval_dataset": "arith_dev",
        "dataset_dir": str(ROOT / "data/01_raw/demo"),
        "cutoff_len": 128,
    }
    pool, _ = process_data({"model_name_or_path": model["model_name_or_path"]}, {"data": data, "train": {"seed": 42}})
    tok = load_tokenizer(model["model_name_or_path"])
    dom = pool["domain_id"]
    base = dom.count(0) / len(dom)
    rows, warm_seconds = [], None
    for name, params, warm_epochs in RUNS:
        if name == "nice":
            params = {**params, "policy_model_path": str(ROOT / params["policy_model_path"])}
        tag = name + "".join(f" {k}={v}" for k, v in params.items() if k in ("C",))
        static_select = {
            "selector": name,
            "params": params,
            "targets": ["arith_dev"],
            "percentage": 0.05,
            "warmup_epochs": warm_epochs,
            "warmup_dir": str(root / "warmup"),
            "cache_dir": str(root / tag.replace(" ", "_")),
        }
        cfg = RunConfig.from_params(
            {
                "model": model,
                "data": data,
                "train": {**train, "output_dir": str(root / "w")},
                "static_select": static_select,
            }
        )
        check_static_select(cfg.static_select, data["dataset_dir"])
        targets = build_targets(cfg.data, cfg.static_select.targets, tok, seed=42)
        start = time.perf_counter()
        warm = one_shot.warmup(cfg, pool)
        if warm_epochs and warm_seconds is None:
            warm_seconds = time.perf_counter() - start
        t0 = time.perf_counter()
        feats = one_shot.compute_features(cfg, pool, targets, warm)
        miss = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = one_shot.compute_features(cfg, pool, targets, warm)
        hit = time.perf_counter() - t0
        t0 = time.perf_counter()
        sel = one_shot.select(cfg, pool, targets, warm, feats)
        pick = time.perf_counter() - t0
        (chosen,) = sel["targets"].values()
        frac = chosen["domain_counts"]["arith_train"] / sum(chosen["domain_counts"].values())
        rows.append((tag, miss, hit, bool(again["features"]["cache_hit"]), pick, frac, len(chosen["indices"])))
        print(
            f"| {tag} | {miss:.2f} | {hit:.2f} ({'hit' if rows[-1][3] else 'MISS'}) | {pick:.2f} | {frac:.2f} |",
            flush=True,
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Embedding and reward selectors (one-shot, static_select)",
        "",
        f"Command: `.venv/bin/python bench/bench_embedding_selectors.py --out bench/RESULTS.md`. {stamp}, "
        f"{machine_label()}, torch {torch.__version__}, 2 threads. Demo tiny model, pool {len(pool)} (6 domains), "
        f"target arith_dev, budget 5% ({rows[0][6]}); arith base rate {base:.2f}. ClusterLESS / NICE: Adam features "
        f"at a 1-epoch warm-up on 5% of the pool ({warm_seconds:.1f} s, shared, not in the rows).",
        "",
        "| selector | compute_features, miss (s) | again, cached (s) | select (s) | arith share of the selection |",
        "|---|---|---|---|---|",
        *[
            f"| {t} | {m:.2f} | {h:.2f} ({'hit' if ok else 'MISS'}) | {p:.2f} | {f:.2f} |"
            for t, m, h, ok, p, f, _ in rows
        ],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
