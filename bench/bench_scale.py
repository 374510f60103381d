"""The scale model (issue #18): how the project's costs grow with model size, pool size and processes, measured on
this machine and extrapolated in a table.

1. `sharding`: full fine-tuning of a random Llama (~100M parameters by default) for a few steps, 1 process vs 2
   processes DDP vs 2 processes FSDP2 (`train.fsdp: full_shard`), through the project's own Trainer, each started
   with `torchrun` (gloo on CPU). Per-rank peak RSS (VmHWM) and the median step time after the first.
2. `matching`: bounded-memory LESS matching (`streamed_less_scores`) over a synthetic datastore written by the
   datastore's own shard writer (float16 features, 1,000,000 x 8192 by default: 16 GB), read as 4 checkpoints
   (the same store four times: four distinct stores would need 64 GB of disk), against one plain read pass of the
   same shards; peak RSS of the matching process (a child, so the parent's memory does not count).
3. `features`: per-sample gradient features (SGD, SJLT k = 8192, LoRA r 8 on every linear layer) against a plain
   forward+backward of the same batches, for models of ~4M, ~20M and ~100M base parameters.
4. The table "what a user needs": datastore size, extraction hours on one A100 (from the measured feature/plain
   ratio and the A100's published bf16 throughput at 40% utilisation), and memory per rank under FSDP2.

Not a test: it prints what it measures and asserts nothing.

    .venv/bin/python bench/bench_scale.py [--parts sharding,matching,features] [--samples 1000000]
    .venv/bin/python bench/bench_scale.py --out bench/RESULTS.md      # also append the section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine_label, quiet_offline_env

quiet_offline_env()

SIZES = {  # name -> (hidden, layers, intermediate, heads); vocab 8000
    "4M": (256, 4, 688, 4),
    "20M": (512, 6, 1376, 8),
    "100M": (768, 12, 2048, 12),
}
A100_BF16_FLOPS = 312e12 * 0.4  # published peak x a typical 40% model-flops utilisation


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _model(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads = SIZES[size]
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _token_rows(n: int, lo: int = 64, hi: int = 128, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, 8000) for _ in range(rng.randrange(lo, hi))]
        rows.append({"input_ids": ids, "labels": [-100] * 16 + ids[16:]})
    return rows


# ----------------------------------------------------------------------------------------------------- sharding
def sharding_worker(mode: str, size: str, steps: int) -> None:
    """One torchrun rank: train `steps` full fine-tuning steps with the project's Trainer; print its numbers."""
    import datasets
    import torch

    from dataflex.data import DataCollatorForCausalLM
    from dataflex.train.trainer import Callback, Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = _model(size)
    rows = _token_rows(8 * steps)
    pool = datasets.Dataset.from_list([{**r, "sample_id": i, "domain_id": 0} for i, r in enumerate(rows)])

    class Pad:
        pad_token_id = 0

    times: list[float] = []

    class Clock(Callback):
        def on_step_end(self, ctx, logs):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8 // world,
            max_steps=steps,
            learning_rate=1e-4,
            logging_steps=steps,
            progress_bar=False,
            num_processes=world,
            fsdp="full_shard" if mode == "fsdp" else None,
        )
        collate = DataCollatorForCausalLM(Pad())
        start = time.perf_counter()
        Trainer(model, pool, args, data_collator=collate, callbacks={"clock": Clock()}).train()
    steps_s = [b - a for a, b in zip([start, *times], times)][1:]
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({"rank": rank, "peak_gib": _peak_rss_gib(), "step_s": statistics.median(steps_s)}), flush=True)
    del torch


def sharding(size: str, steps: int) -> list[dict]:
    out = []
    for mode, procs in (("one", 1), ("ddp", 2), ("fsdp", 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", __file__]
        cmd += ["--worker", mode, "--size", size, "--steps", str(steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // procs))}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        ranks = [json.loads(line) for line in res.stdout.splitlines() if line.startswith('{"rank"')]
        if not ranks:
            raise SystemExit(f"{mode} failed:\n{res.stderr[-3000:]}")
        out.append(
            {
                "mode": mode,
                "processes": procs,
                "peak_gib_per_rank": max(r["peak_gib"] for r in ranks),
                "step_s": max(r["step_s"] for r in ranks),
            }
        )
        print(out[-1], flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- matching
def write_store(root: Path, samples: int, dim: int, shard: int = 16384) -> Path:
    """A complete datastore of random float16 features, written with the datastore's own shard writer."""
    import torch

    from dataflex.features.datastore import FORMAT, write_shard

    path = root / "store"
    path.mkdir(parents=True)
    n_shards = -(-samples // shard)
    manifest = {
        "format": FORMAT,
        "state_key": "synthetic",
        "dataset_key": "synthetic",
        "num_samples": samples,
        "shard_size": shard,
        "dim": dim,
        "shards": {},
        "complete": False,
    }
    gen = torch.Generator().manual_seed(0)
    for s in range(n_shards):
        lo = s * shard
        feats = torch.randn(min(shard, samples - lo), dim, generator=gen).to(torch.float16)
        write_shard(path, manifest, s, lo, feats, n_shards)
    return path


def matching_child(store: str, dim: int) -> None:
    """In a fresh process: one read pass, then streamed matching of 2 targets over 4 checkpoints; print numbers."""
    import torch

    from dataflex.features.datastore import iter_shards
    from dataflex.features.matching import streamed_less_scores

    start = time.perf_counter()
    for _, feats, _ in iter_shards(store):
        int(feats.view(torch.int16).sum())  # every byte read (safetensors may map the file lazily)
    read_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(1)
    targets = {
        t: ([torch.randn(32, dim, generator=gen) for _ in range(4)], [0] * 16 + [1] * 16) for t in ("mmlu", "bbh")
    }
    start = time.perf_counter()
    scores = streamed_less_scores([store] * 4, targets, [1e-4, 8e-5, 6e-5, 4e-5], "max")
    match_s = time.perf_counter() - start
    print(json.dumps({"read_s": read_s, "match_s": match_s, "peak_gib": _peak_rss_gib(), "n": len(scores["mmlu"])}))


def matching(samples: int, dim: int) -> dict:
    with tempfile.TemporaryDirectory(dir=ROOT / "data") as tmp:
        start = time.perf_counter()
        store = write_store(Path(tmp), samples, dim)
        write_s = time.perf_counter() - start
        cmd = [sys.executable, __file__, "--matching-child", str(store), "--dim", str(dim)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"matching failed:\n{res.stderr[-3000:]}")
        out = {"samples": samples, "dim": dim, "store_gb": samples * dim * 2 / 1e9, "write_s": write_s}
        out.update(json.loads(lines[-1]))
        out["match_vs_4_reads"] = out["match_s"] / (4 * out["read_s"])
    print(out, flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- features
def _time_features(model, rows: list[dict], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds of a plain forward+backward and of feature extraction, interleaved."""
    import torch

    from dataflex.features import per_sample_gradient_features
    from dataflex.features.gradients import per_sample_losses

    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> None:
        for i in range(0, len(rows), 16):
            batch = rows[i : i + 16]
            length = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor([r["input_ids"] + [0] * (length - len(r["input_ids"])) for r in batch])
            labels = torch.tensor([r["labels"] + [-100] * (length - len(r["labels"])) for r in batch])
            per_sample_losses(model, ids, labels).sum().backward()
            for p in params:
                p.grad = None

    def ours() -> None:
        per_sample_gradient_features(model, rows, projector="sjlt", proj_dim=8192, batch_size=16)

    timings: dict[str, list[float]] = {"plain": [], "ours": []}
    for r in range(repeats + 1):
        for name, fn in (("plain", plain), ("ours", ours)) if r % 2 else (("ours", ours), ("plain", plain)):
            start = time.perf_counter()
            fn()
            if r:  # the first round warms caches and the projector
                timings[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in timings.items()}


def features(sizes: list[str], n: int, repeats: int) -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model

    out = []
    rows = sorted(_token_rows(n, seed=2), key=lambda r: len(r["input_ids"]))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for size in sizes:
        model = get_peft_model(_model(size), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        model.eval()
        best = _time_features(model, rows, repeats)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {
            "size": size,
            "base_params_m": (sum(p.numel() for p in model.parameters()) - trainable) / 1e6,
            "plain_ms_per_sample": 1e3 * best["plain"] / n,
            "ours_ms_per_sample": 1e3 * best["ours"] / n,
        }
        row["ratio"] = row["ours_ms_per_sample"] / row["plain_ms_per_sample"]
        out.append(row)
        print(row, flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- table
def needs_table(ratio: float) -> str:
    """Pool size x model size -> datastore GB (fp16, k 8192, 4 checkpoints), extraction hours on one A100 (fwd+bwd
    = 6 x params x tokens flops, 512 tokens a sample, times the measured feature/plain ratio), full fine-tuning
    memory per rank under FSDP2 on 8 ranks (fp32 weights + grads + Adam: 16 bytes a parameter / 8)."""
    lines = [
        "| pool | model | datastore (4 ckpts) | extraction, 1 A100 (4 ckpts) | full FT state / rank (8 ranks) |",
        "|---|---|---|---|---|",
    ]
    for pool in (100_000, 270_000, 1_000_000):
        for params in (1e9, 7e9, 8e9):
            gb = pool * 8192 * 2 * 4 / 1e9
            hours = 4 * pool * 6 * params * 512 * ratio / A100_BF16_FLOPS / 3600
            mem = 16 * params / 8 / 2**30
            lines.append(f"| {pool:,} | {params / 1e9:.0f}B | {gb:,.0f} GB | {hours:,.1f} h | {mem:.0f} GiB |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="sharding,matching,features")
    p.add_argument("--size", default="100M", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--feature-samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--matching-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return sharding_worker(args.worker, args.size, args.steps)
    if args.matching_child:
        return matching_child(args.matching_child, args.dim)
    parts = args.parts.split(",")
    report = [f"# Scale model ({time.strftime('%Y-%m-%d')}, {machine_label()})", ""]
    if "sharding" in parts:
        rows = sharding(args.size, args.steps)
        report += [
            f"Full fine-tuning of a random {args.size} Llama, global batch 8, {args.steps} steps (`bench_scale.py`):",
            "",
            "| run | processes | peak RSS / rank | step time |",
            "|---|---|---|---|",
            *[
                f"| {r['mode']} | {r['processes']} | {r['peak_gib_per_rank']:.2f} GiB | {r['step_s']:.2f} s |"
                for r in rows
            ],
            "",
        ]
    if "matching" in parts:
        m = matching(args.samples, args.dim)
        report += [
            f"Streamed LESS matching: {m['samples']:,} x {m['dim']} float16 ({m['store_gb']:.1f} GB) read as 4 "
            f"checkpoints, 2 targets x 2 subtasks: {m['match_s']:.1f} s vs {4 * m['read_s']:.1f} s for 4 plain reads "
            f"({m['match_vs_4_reads']:.2f}x); peak RSS {m['peak_gib']:.2f} GiB (goal <= 4 GiB, <= 2x reading).",
            "",
        ]
    ratio = 1.0
    if "features" in parts:
        rows = features(list(SIZES), args.feature_samples, args.repeats)
        ratio = max(r["ratio"] for r in rows)
        report += [
            "Per-sample gradient features (SGD, SJLT k 8192, LoRA r 8 on every linear) vs a plain forward+backward:",
            "",
            "| model | base params | plain ms/sample | features ms/sample | ratio (goal <= 1.15) |",
            "|---|---|---|---|---|",
            *[
                f"| {r['size']} | {r['base_params_m']:.1f}M | {r['plain_ms_per_sample']:.1f} | "
                f"{r['ours_ms_per_sample']:.1f} | {r['ratio']:.3f} |"
                for r in rows
            ],
            "",
        ]
    report += ["What a user needs (extrapolated; the ratio is the largest measured above):", "", needs_table(ratio), ""]
    text = "\n".join(report)
    print(text)
    if args.out:
        with args.out.open("a") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
