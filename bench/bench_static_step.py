"""Static training step time: dataflex's loop vs `transformers.Trainer`, same tiny model, data and batch.

What is timed (identically for both): the wall time between consecutive optimizer-step ends, taken with
`time.perf_counter()` in an `on_step_end` hook (our `Callback` / an HF `TrainerCallback`). One such interval
covers one whole loop iteration: fetching + collating the step's micro-batches, forward, backward, gradient
clipping, `optimizer.step()`, `scheduler.step()`, zero_grad, and the loop's own bookkeeping/logging. The
first `--warmup-steps-untimed` steps of every run are excluded (allocator / first-call effects). A run's
figure is the median of its `--steps` timed intervals (robust to bursts from other processes on a shared
machine); their mean, (t_end[last] - t_end[warmup]) / steps, is printed too. Model loading and trainer
construction are not timed.

Both trainers get: a freshly loaded model (same seed), the same pre-shuffled dataset read sequentially (same
batches in the same order), fused AdamW, cosine schedule with the same warmup, clipping at 1.0, fp32 on CPU,
no checkpoints, no progress bar, the same logging interval. Repeats alternate which trainer runs first
(AB, BA, AB, ...) so slow drifts of the machine hit both. The final training losses are compared as a check
that both did the same work.

This is a benchmark, not a test: it prints ratios measured side by side in one run and asserts no time.

    .venv/bin/python bench/bench_static_step.py                       # defaults: tiny "default" model, LoRA
    .venv/bin/python bench/bench_static_step.py --out bench/RESULTS.md  # also append a row to RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_label, quiet_offline_env, silence_libraries  # noqa: E402

quiet_offline_env()

import torch  # noqa: E402

from dataflex.train.trainer import Callback  # noqa: E402

DOMAINS = ["arith_train", "reverse_train", "sort_train", "wordcount_train", "facts_train", "format_train"]
COLUMNS = ["input_ids", "labels", "sample_id", "domain_id"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["default", "test"], default="default", help="tiny model size")
    p.add_argument("--finetuning", choices=["lora", "full"], default="lora")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup-steps-untimed", type=int, default=5, help="steps run before timing starts, per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="append a markdown row to this file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    if min(args.batch_size, args.grad_accum, args.steps, args.repeats) < 1 or args.warmup_steps_untimed < 1:
        p.error("batch-size, grad-accum, steps, repeats and warmup-steps-untimed must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ setup


def build_inputs(work: Path, args: argparse.Namespace):
    """Demo corpus + freshly initialised tiny model (no pre-training: timing does not need a trained model)."""
    from dataflex.data import build_dataset, demo_texts, make_demo_data
    from dataflex.models import init_tiny_model, load_tokenizer

    total_samples = (args.steps + args.warmup_steps_untimed) * args.batch_size * args.grad_accum
    per_domain = max(100, -(-total_samples // len(DOMAINS)))  # one epoch covers every run: no epoch boundary
    demo = make_demo_data(
        work / "demo",
        seed=0,
        train_per_domain=per_domain,
        dev_per_domain=4,
        test_per_domain=4,
        text_docs_per_domain=100,
    )
    model_dir = init_tiny_model(work / "model", demo_texts(demo), size=args.size, seed=0)
    tokenizer = load_tokenizer(str(model_dir))
    pool = build_dataset(
        dataset=DOMAINS,
        dataset_dir=demo,
        tokenizer=tokenizer,
        template="default",
        cutoff_len=args.cutoff_len,
        stage="sft",
    )
    # Mixed-domain batches read sequentially by both trainers: same batches in the same order.
    pool = pool.select_columns(COLUMNS).shuffle(seed=0).flatten_indices()
    return model_dir, tokenizer, pool


def load(model_dir: Path, args: argparse.Namespace):
    from dataflex.models import load_model

    return load_model(
        str(model_dir),
        finetuning_type=args.finetuning,
        lora_target="all",
        lora_rank=8,
        lora_alpha=16,
        dtype="fp32",
        seed=0,
    )


def hparams(args: argparse.Namespace, total_steps: int) -> dict:
    """Arguments with the same name and meaning in both TrainingArguments classes."""
    return dict(
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=2e-3,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_steps=total_steps,
        seed=42,
        logging_steps=10,
    )


# ------------------------------------------------------------------------------------------------ runs


class StepClock(Callback):
    """perf_counter() at every optimizer-step end; usable as our callback and (via HFClock) an HF callback."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, *_args, **_kwargs) -> None:
        self.ends.append(time.perf_counter())

    def per_step(self, warmup: int) -> tuple[float, float]:
        """(median, mean) of the timed step intervals, in seconds."""
        intervals = [b - a for a, b in zip(self.ends[warmup - 1 : -1], self.ends[warmup:])]
        return statistics.median(intervals), statistics.fmean(intervals)


def run_ours(model_dir, tokenizer, pool, args, total_steps: int, out_dir: Path) -> tuple[tuple[float, float], float]:
    from dataflex.data import DataCollatorForCausalLM
    from dataflex.train.trainer import Trainer, TrainingArguments

    clock = StepClock()
    targs = TrainingArguments(
        output_dir=str(out_dir / "ours"),
        disable_shuffling=True,
        progress_bar=False,
        save_steps=0,
        **hparams(args, total_steps),
    )
    trainer = Trainer(
        load(model_dir, args), pool, targs, data_collator=DataCollatorForCausalLM(tokenizer), callbacks={"clock": clock}
    )
    result = trainer.train()
    assert result.global_step == total_steps == len(clock.ends)
    return clock.per_step(args.warmup_steps_untimed), result.train_loss_mean


def run_hf(model_dir, tokenizer, pool, args, total_steps: int, out_dir: Path) -> tuple[tuple[float, float], float]:
    from transformers import PrinterCallback, TrainerCallback
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    from dataflex.data import DataCollatorForCausalLM

    clock = StepClock()

    class HFClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            clock.on_step_end()

    collate = DataCollatorForCausalLM(tokenizer)

    def hf_collate(rows):  # the HF model's forward takes no sample_id / domain_id
        batch = collate(rows)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    hf_args = HFArgs(
        output_dir=str(out_dir / "hf"),
        report_to=[],
        use_cpu=True,
        train_sampling_strategy="sequential",
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        **hparams(args, total_steps),
    )
    trainer = HFTrainer(
        model=load(model_dir, args), args=hf_args, train_dataset=pool, data_collator=hf_collate, callbacks=[HFClock()]
    )
    trainer.remove_callback(PrinterCallback)  # no log printing on either side (ours: progress_bar=False)
    result = trainer.train()
    assert result.global_step == total_steps == len(clock.ends)
    return clock.per_step(args.warmup_steps_untimed), result.training_loss


# ------------------------------------------------------------------------------------------------ report


def config_label(args: argparse.Namespace) -> str:
    return (
        f"size={args.size} {args.finetuning} bs={args.batch_size} ga={args.grad_accum} "
        f"cutoff={args.cutoff_len} steps={args.steps}(+{args.warmup_steps_untimed} untimed) "
        f"repeats={args.repeats}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    silence_libraries()

    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(
            f"warning: 1-min load average is {load_before:.2f} before the run: other processes may compete for the "
            "CPU and make both timings noisy (ratios are side by side, but bursts do not hit both equally)"
        )
    total_steps = args.steps + args.warmup_steps_untimed
    runners = {"ours": run_ours, "hf": run_hf}
    times: dict[str, list[float]] = {"ours": [], "hf": []}  # per run: median step interval
    means: dict[str, list[float]] = {"ours": [], "hf": []}  # per run: mean step interval
    losses: dict[str, list[float]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory(prefix="dataflex-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_dir, tokenizer, pool = build_inputs(work, args)
        print(f"setup: {len(pool)} samples, model {args.size}, {time.perf_counter() - t0:.1f}s", flush=True)
        # One short untimed run of each first: imports, lazy init and first-touch allocations.
        warm = argparse.Namespace(**{**vars(args), "steps": 1})
        for fn in runners.values():
            fn(model_dir, tokenizer, pool, warm, warm.steps + warm.warmup_steps_untimed, work)
        print("s/step = median (mean) of the timed step intervals of one run", flush=True)
        print(f"{'repeat':>6} {'order':>8} {'ours s/step':>16} {'HF s/step':>16} {'ours/HF':>14}", flush=True)
        for r in range(args.repeats):
            order = ["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]
            for name in order:
                (median, mean), loss = runners[name](model_dir, tokenizer, pool, args, total_steps, work)
                times[name].append(median)
                means[name].append(mean)
                losses[name].append(loss)
            o, h, om, hm = times["ours"][-1], times["hf"][-1], means["ours"][-1], means["hf"][-1]
            print(
                f"{r + 1:>6} {'/'.join(order):>8} {o:>8.4f} ({om:.4f}) {h:>8.4f} ({hm:.4f}) "
                f"{o / h:>6.3f} ({om / hm:.3f})",
                flush=True,
            )

    med_ours, med_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    ratio_of_medians = med_ours / med_hf
    median_ratio = statistics.median(o / h for o, h in zip(times["ours"], times["hf"]))
    mean_ratio = statistics.median(o / h for o, h in zip(means["ours"], means["hf"]))
    loss_gap = max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"]))
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_label()
    print()
    print(f"config:            {config_label(args)}")
    print(f"median ours:       {med_ours:.4f} s/step")
    print(f"median HF:         {med_hf:.4f} s/step")
    print(f"ratio of medians:  {ratio_of_medians:.3f}  (ours / HF; goal <= 1.05)")
    print(f"median of ratios:  {median_ratio:.3f}  (same, from per-run means: {mean_ratio:.3f})")
    print(f"train loss check:  ours {losses['ours'][0]:.6f}  HF {losses['hf'][0]:.6f}  max |diff| {loss_gap:.2e}")
    print(
        f"torch {torch.__version__} (threads {torch.get_num_threads()}), transformers {transformers.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"machine:           {machine}  (1-min load average before/after: {load_before:.2f} / "
        f"{os.getloadavg()[0]:.2f}; the run itself adds ~{torch.get_num_threads()})"
    )
    print(f"date:              {date}")
    if args.out:
        row = (
            f"| {date} | {machine} | {config_label(args)} | torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} threads | {med_ours:.4f} | "
            f"{med_hf:.4f} | {ratio_of_medians:.3f} | {median_ratio:.3f} |\n"
        )
        with args.out.open("a") as f:
            f.write(row)
        print(f"appended a row to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
