"""Dynamic selection timing on the demo: one online-LESS selection vs a plain batched forward+backward over the
pool and the targets, and a whole dynamic-select run vs static training for the same number of optimizer steps.

Goal (issue #4): one online-LESS selection <= 1.2x the plain forward+backward over pool + targets. Run from the
project root after `make demo`:

    .venv/bin/python bench/bench_select_timing.py [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine_label, quiet_offline_env, report

quiet_offline_env()

import torch  # noqa: E402

from dataflex.config import DEFAULTS, RunConfig  # noqa: E402
from dataflex.features.gradients import _as_rows, _pad, per_sample_losses  # noqa: E402
from dataflex.features.token_losses import IGNORE_INDEX  # noqa: E402
from dataflex.pipelines.data_processing.nodes import process_data  # noqa: E402
from dataflex.train import run as run_core  # noqa: E402
from dataflex.train.modes import select  # noqa: E402

DOMAINS = ["arith", "reverse", "sort", "wordcount", "facts", "format"]
MODEL_DIR = "data/01_raw/tiny_llama"


def plain_forward_backward(model: torch.nn.Module, datasets_: list, batch_size: int) -> float:
    """Length-sorted right-padded batches, loss = sum of per-sample token means, backward into .grad."""
    start = time.perf_counter()
    model.eval()
    for ds in datasets_:
        ids, labels = _as_rows(ds)
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            x, y = _pad([ids[i] for i in rows], 0, "cpu"), _pad([labels[i] for i in rows], IGNORE_INDEX, "cpu")
            per_sample_losses(model, x, y).sum().backward()
            model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="append a markdown section to this file")
    p.add_argument("--repeats", type=int, default=3, help="interleaved selection / plain pairs (medians reported)")
    args = p.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="select_timing_"))
    data = {
        **DEFAULTS["data"],
        "dataset": ",".join(f"{d}_train" for d in DOMAINS),
        "eval_dataset": "arith_dev",
        "dataset_dir": "data/01_raw/demo",
        "cutoff_len": 128,
    }
    pool, targets = process_data({"model_name_or_path": MODEL_DIR}, {"data": data, "train": {"seed": 42}})
    model = {
        "model_name_or_path": MODEL_DIR,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "dtype": "fp32",
    }
    train = {
        **DEFAULTS["train"],
        "per_device_train_batch_size": 16,
        "learning_rate": 2e-3,
        "logging_steps": 5,
        "progress_bar": False,
        "seed": 42,
    }
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": "less",
        "warmup_step": 5,
        "update_step": 5,
        "update_times": 3,
        "components": {"selectors": {"less": {"name": "less", "params": {"proj_dim": 8192}}}},
    }

    # 1. One selection (features + scoring, cache miss) vs the plain pass over the same samples, interleaved
    # `--repeats` times (caches removed before each selection) so load on the machine hits both alike; medians.
    def config(train_group: dict) -> RunConfig:
        return RunConfig.from_params({"model": model, "train": train_group, "dataflex": flex})

    t1 = {**train, "output_dir": str(root / "one")}
    cfg1 = config(t1)
    state = select.train_segment(cfg1, pool, targets, 0)
    net = run_core.load_checkpoint_model(cfg1.model, state["checkpoint"], 42)
    sel_times, plain_times = [], []
    for _ in range(args.repeats):
        for sub in ("selector_cache", "selections"):
            shutil.rmtree(Path(t1["output_dir"]) / sub, ignore_errors=True)
        start = time.perf_counter()
        _, sel = select.select_round(cfg1, pool, targets, state)
        sel_times.append(time.perf_counter() - start)
        assert sel["cache"] == "miss"
        plain_times.append(plain_forward_backward(net, [pool, targets["arith_dev"]], 16))
    selection_s, plain_s = statistics.median(sel_times), statistics.median(plain_times)
    per_pair = ", ".join(f"{a / b:.2f}" for a, b in zip(sel_times, plain_times))

    # 2. A whole dynamic-select run (20 steps, 3 online-LESS selections) vs static training for 20 steps.
    start = time.perf_counter()
    run = select.run_all(config({**train, "output_dir": str(root / "run")}), pool, targets)
    select_run_s = time.perf_counter() - start
    start = time.perf_counter()
    static = {**train, "output_dir": str(root / "static"), "max_steps": run["global_step"]}
    run_core.train(RunConfig.from_params({"model": model, "train": static}), pool)
    static_s = time.perf_counter() - start

    n = len(pool) + len(targets["arith_dev"])
    rows = [
        (f"one online-LESS selection (features + scores, miss), median of {args.repeats}", selection_s),
        (f"plain batched forward+backward over pool + target ({n} samples), median of {args.repeats}", plain_s),
        (f"dynamic_select run, less, {run['global_step']} steps, 3 selections", select_run_s),
        (f"static training, {run['global_step']} steps", static_s),
    ]
    ratios = (
        f"selection / plain forward+backward: **{selection_s / plain_s:.2f}** (goal <= 1.2; per interleaved "
        f"pair: {per_pair}); dynamic-select run / static: **{select_run_s / static_s:.2f}**"
    )
    context = (
        f"Command: `.venv/bin/python bench/bench_select_timing.py --out bench/RESULTS.md`. {machine_label()}, "
        f"torch {torch.__version__}, 2 threads. Demo tiny model, pool {len(pool)}, target arith_dev, G = 16, "
        "k = 8192 (SJLT)."
    )
    report(args.out, "Dynamic selection timing", context, ["measurement", "seconds"], rows, ratios)


if __name__ == "__main__":
    main()
