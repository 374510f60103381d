"""Dynamic selection on the demo: each selector's per-round share of the target domain and the target test loss.

Not a timing benchmark. The same run for each selector: demo tiny model, the 6-domain pool of 1,800 samples,
eval_dataset arith_dev, G = 16, warmup_step 5, update_step 5, update_times 3 (20 steps). Then arith_test loss
of each final adapter. Run from the project root after `make demo`:

    .venv/bin/python bench/bench_select_quality.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import quiet_offline_env

quiet_offline_env()

import torch  # noqa: E402

from dataflex.config import DEFAULTS, RunConfig  # noqa: E402
from dataflex.evaluation import evaluate_sets  # noqa: E402
from dataflex.models import load_tokenizer  # noqa: E402
from dataflex.pipelines.data_processing.nodes import process_data  # noqa: E402
from dataflex.train.modes import select  # noqa: E402
from dataflex.train.run import build_model  # noqa: E402

DOMAINS = ["arith", "reverse", "sort", "wordcount", "facts", "format"]
MODEL_DIR = "data/01_raw/tiny_llama"
RUNS = [
    ("random", {}),
    ("less", {"proj_dim": 2048, "gradient_type": "adam"}),
    ("less", {"proj_dim": 2048, "gradient_type": "sgd"}),
    ("loss", {}),
    ("delta_loss", {}),
]


def main() -> None:
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="select_quality_"))
    data = {
        **DEFAULTS["data"],
        "dataset": ",".join(f"{d}_train" for d in DOMAINS),
        "eval_dataset": "arith_dev",
        "dataset_dir": "data/01_raw/demo",
        "cutoff_len": 128,
    }
    pool, targets = process_data({"model_name_or_path": MODEL_DIR}, {"data": data, "train": {"seed": 42}})
    _, tests = process_data(
        {"model_name_or_path": MODEL_DIR}, {"data": {**data, "eval_dataset": "arith_test"}, "train": {"seed": 42}}
    )
    model = {
        "model_name_or_path": MODEL_DIR,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "dtype": "fp32",
    }
    tok = load_tokenizer(MODEL_DIR)
    for name, params in RUNS:
        tag = name + (f"/{params['gradient_type']}" if "gradient_type" in params else "")
        train = {
            **DEFAULTS["train"],
            "output_dir": str(root / tag.replace("/", "_")),
            "seed": 42,
            "per_device_train_batch_size": 16,
            "learning_rate": 2e-3,
            "logging_steps": 5,
            "progress_bar": False,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.05,
        }
        flex = {
            **DEFAULTS["dataflex"],
            "train_type": "dynamic_select",
            "component_name": name,
            "warmup_step": 5,
            "update_step": 5,
            "update_times": 3,
            "components": {"selectors": {name: {"name": name, "params": params}}},
        }
        start = time.perf_counter()
        cfg = RunConfig.from_params({"model": model, "train": train, "dataflex": flex})
        result = select.run_all(cfg, pool, targets)
        net = build_model(cfg.model, 42, adapter_path=result["adapter_dir"])
        loss = evaluate_sets(
            net, tok, tests, batch_size=32, generate=False, max_new_tokens=4, max_generate_samples=0, stage="sft"
        )["arith_test"]["loss"]
        share = [
            round(h["domain_counts"]["arith_train"] / sum(h["domain_counts"].values()), 2)
            for h in result["selection_history"]
        ]
        print(f"| {tag} | {share} | {loss:.4f} | {time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
