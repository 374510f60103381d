"""Scaling of feature extraction with 1 vs 2 processes on this machine's CPU (issue #7).

One online-LESS `compute_features` on the demo pool (Adam features of every pool sample plus SGD features of
the target, SJLT k = 8192) at the same TrainState, run in-process (1 process, torch's threads over all cores)
and on 2 accelerate workers (gloo; each computes half of the rows with cores / 2 threads). Reported: the
node's wall time (2 processes: including starting the workers and saving their inputs) and the datastore's
own extraction time. Side by side in one run, the caches removed before each measurement; medians of
`--repeats` interleaved pairs. Run from the project root after `make demo`:

    .venv/bin/python bench/bench_scaling.py [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import demo_groups, machine_label, quiet_offline_env, report

quiet_offline_env()

import torch  # noqa: E402

from dataflex.config import DEFAULTS, RunConfig  # noqa: E402
from dataflex.pipelines.data_processing.nodes import process_data  # noqa: E402
from dataflex.train.modes import select  # noqa: E402

DOMAINS = ["arith", "reverse", "sort", "wordcount", "facts", "format"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="append a markdown section to this file")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    model, train_demo = demo_groups()
    data = {
        **DEFAULTS["data"],
        "dataset": ",".join(f"{d}_train" for d in DOMAINS),
        "eval_dataset": "arith_dev",
        "dataset_dir": "data/01_raw/demo",
        "cutoff_len": 128,
    }
    pool, targets = process_data(
        {"model_name_or_path": model["model_name_or_path"]}, {"data": data, "train": {"seed": 42}}
    )
    root = Path(tempfile.mkdtemp(prefix="scaling_"))
    train = {
        **train_demo,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "progress_bar": False,
        "output_dir": str(root),
        "num_processes": 1,
    }
    flex = {
        **DEFAULTS["dataflex"],
        "train_type": "dynamic_select",
        "component_name": "less",
        "warmup_step": 5,
        "update_step": 5,
        "update_times": 1,
        "components": {"selectors": {"less": {"name": "less", "params": {"proj_dim": 8192}}}},
    }
    cfg = RunConfig.from_params({"model": model, "train": train, "dataflex": flex})
    state = select.train_segment(cfg, pool, targets, 0)
    # The same TrainState read with 2 processes x 8 x 1: the same global batch, so the same plan.
    two = {**train, "gradient_accumulation_steps": 1, "num_processes": 2}
    variants = {1: cfg, 2: RunConfig.from_params({"model": model, "train": two, "dataflex": flex})}
    wall: dict[int, list[float]] = {1: [], 2: []}
    extract: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for n, run_cfg in variants.items():
            shutil.rmtree(root / "selector_cache", ignore_errors=True)
            start = time.perf_counter()
            feats = select.compute_features(run_cfg, pool, targets, state)
            wall[n].append(time.perf_counter() - start)
            f = feats["features"]
            assert f["pool"]["status"] == "computed", f["pool"]["status"]
            extract[n].append(f["pool"]["seconds"] + f["target"]["seconds"])
    med = {k: {n: statistics.median(v[n]) for n in (1, 2)} for k, v in (("wall", wall), ("extract", extract))}
    rows = [
        (f"compute_features node, {n} process{'es' if n > 1 else ''}", med["wall"][n], med["extract"][n])
        for n in (1, 2)
    ]
    ratios = (
        f"speed-up with 2 processes: node **{med['wall'][1] / med['wall'][2]:.2f}x**, extraction alone "
        f"**{med['extract'][1] / med['extract'][2]:.2f}x** (medians of {args.repeats} interleaved pairs)"
    )
    context = (
        f"Command: `.venv/bin/python bench/bench_scaling.py --out bench/RESULTS.md`. {machine_label()}, torch "
        f"{torch.__version__}. Demo tiny model, pool {len(pool)} + {len(targets['arith_dev'])} target samples, "
        "online-LESS features (Adam pool + SGD target, SJLT k = 8192), 2 processes on gloo."
    )
    report(
        args.out,
        "Feature extraction on 1 vs 2 processes (CPU)",
        context,
        ["run", "node wall s", "datastore extraction s"],
        rows,
        ratios,
    )


if __name__ == "__main__":
    main()
