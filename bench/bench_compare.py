"""compare: one comparison with shared caches vs the same cells run one by one without them.

Arms static / random (dynamic_select) / two LESS arms differing only in `percentage`, x `--seeds` seeds, each at a
budget of `--steps` optimizer steps, on the test-size tiny model and a small demo corpus (both built in a temp
folder, so the bench needs nothing from data/). Both sides run the same cells through the compare pipeline's own
library (`plan_cells`, `run_cell`), in one process, without Kedro or MLflow (the same overhead would be added to
both):

- shared: the comparison as `kedro run --pipelines=compare` runs it: one tokenised pool and eval sets for every
  cell, and one set of content-keyed caches (LESS warm-up, gradient datastore), so the LESS feature stage is
  computed once for both LESS arms and every seed.
- one by one: every cell alone, as separate runs would be: its own empty tokenisation / warm-up / datastore caches,
  its pool tokenised again.

The shared side runs first (the one-by-one side then finds the OS file cache warm: it is, if anything, favoured).
This is a benchmark, not a test: it asserts nothing.

    .venv/bin/python bench/bench_compare.py
    .venv/bin/python bench/bench_compare.py --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import machine_label, quiet_offline_env, silence_libraries  # noqa: E402

quiet_offline_env()


def base_params(model: Path, demo: Path, root: Path, steps: int, seeds: int) -> dict[str, Any]:
    from dataflex.pipelines.compare.cells import _merge

    less = {"pipeline": "less", "less_warmup_epochs": 2, "less_warmup_percentage": 0.2, "less_proj_dim": 512}
    base = {
        "model": {"model_name_or_path": str(model), "lora_rank": 4},
        "data": {
            "dataset_dir": str(demo),
            "dataset": ["arith_train", "reverse_train", "sort_train", "wordcount_train"],
            "eval_dataset": ["arith_test"],
            "cutoff_len": 64,
        },
        "train": {"per_device_train_batch_size": 8, "logging_steps": 5, "progress_bar": False},
        "eval": {"generate": False},
        "demo": {"build_if_missing": False},
        "compare": {
            "arms": [
                {"name": "static", "train_type": "static"},
                {"name": "random", "train_type": "dynamic_select", "component_name": "random"}
                | {"warmup_step": steps // 2, "update_step": steps // 4, "update_times": 2},
                {"name": "less_a", **less, "less_percentage": 0.1, "less_targets": ["arith_dev"]},
                {"name": "less_b", **less, "less_percentage": 0.2, "less_targets": ["arith_dev"]},
            ],
            "seeds": list(range(seeds)),
            "budget_steps": steps,
        },
    }
    return _merge(base, cache_groups(root))


def cache_groups(root: Path) -> dict[str, Any]:
    """Every cache and output folder of a run under `root` (a fresh root: nothing to reuse)."""
    return {
        "data": {"cache_dir": str(root / "cache")},
        "less": {"warmup_dir": str(root / "warmup"), "datastore_dir": str(root / "feature")},
        "static_select": {"warmup_dir": str(root / "warmup_ss"), "cache_dir": str(root / "feature_ss")},
    }


def pools(params: dict[str, Any]) -> tuple[Any, Any]:
    from dataflex.config import RunConfig
    from dataflex.data.pools import build_pools
    from dataflex.models import load_tokenizer

    cfg = RunConfig.from_params(params)
    return build_pools(cfg.data, load_tokenizer(cfg.model.model_name_or_path), seed=cfg.train.seed)


def with_caches(cell: Any, root: Path) -> Any:
    from dataflex.pipelines.compare.cells import _merge

    params = _merge(cell.params, cache_groups(root))
    params["train"]["output_dir"] = str(root / "out")
    return replace(cell, params=params, output_dir=str(root / "out"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="budget_steps of every arm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    silence_libraries()
    import torch

    from dataflex.data import make_demo_data
    from dataflex.pipelines.compare.cells import _merge, plan_cells, run_cell
    from dataflex.train.tiny_model import make_tiny_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="bench_compare_"))
    demo, model = tmp / "demo", tmp / "tiny"
    make_demo_data(demo, seed=0, train_per_domain=150, dev_per_domain=8, test_per_domain=32, text_docs_per_domain=8)
    make_tiny_model(
        model, demo, size="test", seed=0, pretrain_steps=50, block_size=64, batch_size=8, progress_bar=False
    )

    shared_root = tmp / "shared"
    params = base_params(model, demo, shared_root, args.steps, args.seeds)
    params["train"]["output_dir"] = str(shared_root / "out")
    cells = plan_cells(params)

    start = time.perf_counter()
    pool, evals = pools(params)
    shared = [run_cell(c, pool, evals) for c in cells]
    shared_wall = time.perf_counter() - start

    start = time.perf_counter()
    alone = []
    for i, cell in enumerate(cells):
        own = with_caches(cell, tmp / f"alone-{i}")
        pool_i, evals_i = pools(_merge(params, cache_groups(tmp / f"alone-{i}")))
        alone.append(run_cell(own, pool_i, evals_i))
    alone_wall = time.perf_counter() - start

    def row(label: str, wall: float, summaries: list[dict]) -> tuple:
        less = [s["caches"] for s in summaries if s.get("caches")]
        warmups = sum(c["warmup_cache"] == "miss" for c in less)
        stores = sum(c["datastore_checkpoints"] - c["datastore_hits"] for c in less)
        feature = sum(float(s["feature_seconds"]) for s in summaries)
        return (label, len(summaries), wall, feature, warmups, stores)

    rows = [
        row("one comparison, shared caches", shared_wall, shared),
        row("one by one, no shared caches", alone_wall, alone),
    ]
    context = (
        f"`.venv/bin/python bench/bench_compare.py --steps {args.steps} --seeds {args.seeds}` on {machine_label()}, "
        f"Python {sys.version.split()[0]}; test-size tiny model (50 pre-training steps), 4 demo task domains x 150 "
        "rows, arms static / random / less (10%) / less (20%), LESS warm-up 2 epochs on 20% of the pool, proj_dim 512"
    )
    header = ["run", "cells", "wall s", "feature s (sum)", "LESS warm-ups trained", "datastore checkpoints computed"]
    summary = (
        f"The shared comparison took {shared_wall:.1f} s, {alone_wall / shared_wall:.2f}x faster than the same "
        f"cells one by one ({alone_wall:.1f} s): the LESS warm-up and datastore are computed once instead of once "
        "per LESS cell, and the pool is tokenised once."
    )
    from _common import report

    report(args.out, "compare: shared caches vs one by one", context, header, rows, summary)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
