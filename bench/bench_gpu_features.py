"""GPU check of the gradient features (specs/gradient-features.md §7, issue #7), prepared for a device session.

A random Llama config of about 0.5B parameters (hidden 1024, 24 layers, intermediate 2816, vocab 32000) in
bf16 with LoRA r = 8 on all 7 projection modules; 256 samples of T = 512 tokens (the first 64 label-masked).
Side by side in one run, TF32 off: a plain batched forward+backward (the floor), our batched extraction
(`per_sample_gradient_features`, SGD and Adam, SJLT k = 8192) at batch 8 / 16 / 32, and a batch-size-1 loop
(backward per sample, flatten, the same projection). Also the features' agreement with the loop. About 3-5
minutes of device time:

    python bench/bench_gpu_features.py --out bench/RESULTS.md          # on the GPU machine
    .venv/bin/python bench/bench_gpu_features.py --small               # a CPU smoke run of the script itself

With `--fsdp`, run under torchrun (`torchrun --nproc_per_node N bench/bench_gpu_features.py --fsdp`): the model
is sharded with the project's FSDP2 (`dataflex.distributed.fsdp`, full_shard over NCCL, or gloo on CPU) and each
rank extracts the features of its share of the samples on the sharded model, against a plain forward+backward of
the same share; rank 0 reports the slowest rank's times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import machine_label, quiet_offline_env, report

quiet_offline_env()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dataflex.features.gradients import per_sample_gradient_features, per_sample_losses  # noqa: E402
from dataflex.features.projectors import Projector  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.inter,
        vocab_size=args.vocab,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    base = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=MODULES))
    with torch.no_grad():  # a random LoRA B (not zeros) so that the A gradients are not all zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def plain(model: torch.nn.Module, rows: list[dict], batch_size: int, device: torch.device) -> None:
    model.eval()
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        x = torch.tensor([r["input_ids"] for r in chunk], device=device)
        y = torch.tensor([r["labels"] for r in chunk], device=device)
        per_sample_losses(model, x, y).sum().backward()
        model.zero_grad(set_to_none=True)


def loop(model: torch.nn.Module, rows: list[dict], proj: Projector, device: torch.device) -> torch.Tensor:
    """LESS-style: one backward per sample, the flattened gradient projected by the same SJLT map."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = torch.zeros(len(rows), proj.out_dim, device=device)
    model.eval()
    for i, r in enumerate(rows):
        x = torch.tensor([r["input_ids"]], device=device)
        y = torch.tensor([r["labels"]], device=device)
        per_sample_losses(model, x, y).sum().backward()
        flat = torch.cat([p.grad.reshape(1, -1).float() for _, p in named], dim=1)
        proj.project_all_into(out[i : i + 1], flat, scratch=True)
        model.zero_grad(set_to_none=True)
    return out.cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="append a markdown section to this file")
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke run of the script (CPU is fine)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--loop-samples", type=int, default=64, help="the bs=1 loop runs on this many (per-sample time)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: features on the FSDP2-sharded model")
    args = p.parse_args()
    args.hidden, args.layers, args.inter, args.vocab, args.seq = 1024, 24, 2816, 32000, 512
    if args.small:
        args.hidden, args.layers, args.inter, args.vocab, args.seq = 128, 2, 256, 500, 64
        args.samples, args.loop_samples = 32, 8
    if args.fsdp:
        return sharded(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = build(args, device)
    n_params = sum(q.numel() for q in model.parameters())
    gen = torch.Generator().manual_seed(1)
    masked = args.seq // 8
    rows = []
    for _ in range(args.samples):
        ids = torch.randint(3, args.vocab, (args.seq,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    moments = {
        n: {
            "exp_avg": 1e-3 * torch.randn(q.shape, generator=gen).to(device),
            "exp_avg_sq": 1e-6 * torch.rand(q.shape, generator=gen).to(device),
        }
        for n, q in named
    }
    proj = Projector("sjlt", [(n, q.numel()) for n, q in named], proj_dim=8192, seed=0)

    results: list[tuple[str, float]] = []
    plain(model, rows[:16], 16, device)  # warm-up (kernels, allocator)
    t_plain, _ = timed(device, lambda: plain(model, rows, 16, device))
    results.append(("plain batched forward+backward, bs 16 (floor)", t_plain))
    feats = {}
    for bs in (8, 16, 32):
        t, feats[bs] = timed(
            device, lambda bs=bs: per_sample_gradient_features(model, rows, projector=proj, batch_size=bs)
        )
        results.append((f"ours, SGD features, bs {bs}", t))
    t_adam, _ = timed(
        device,
        lambda: per_sample_gradient_features(
            model, rows, gradient_type="adam", optimizer_state=moments, projector=proj, batch_size=16
        ),
    )
    results.append(("ours, Adam features, bs 16", t_adam))
    sub = rows[: args.loop_samples]
    t_loop, looped = timed(device, lambda: loop(model, sub, proj, device))
    t_loop_all = t_loop * len(rows) / len(sub)
    results.append((f"bs=1 loop, SGD features (measured on {len(sub)}, scaled to {len(rows)})", t_loop_all))
    ref = feats[16][: len(sub)].float()
    rel = float(((ref - looped).norm(dim=1) / looped.norm(dim=1).clamp(min=1e-30)).max())

    ratios = (
        f"ours bs 16 / plain: **{results[2][1] / t_plain:.2f}**; bs=1 loop / ours bs 16: "
        f"**{t_loop_all / results[2][1]:.1f}x**; max row relative difference ours vs loop: {rel:.2e} "
        f"({'bf16' if device.type == 'cuda' else 'fp32'} model, TF32 off)"
    )
    what = torch.cuda.get_device_name() if device.type == "cuda" else machine_label()
    context = (
        f"Command: `python bench/bench_gpu_features.py --out bench/RESULTS.md`. {what}, torch "
        f"{torch.__version__}. {n_params / 1e6:.0f}M parameters, LoRA r 8 on 7 modules, {len(rows)} samples x "
        f"T {args.seq}, SJLT k 8192."
    )
    report(args.out, "Gradient features on a GPU (~0.5B random Llama)", context, ["run", "seconds"], results, ratios)


def sharded(args: argparse.Namespace) -> None:
    """Features on the FSDP2-sharded model, each rank on its contiguous share of the samples."""
    import os

    import torch.distributed as dist

    from dataflex.distributed.fsdp import FsdpSettings, shard_model

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = shard_model(build(args, device), FsdpSettings("full_shard"))
    gen = torch.Generator().manual_seed(1)
    masked = args.seq // 8
    rows = []
    for _ in range(args.samples):
        ids = torch.randint(3, args.vocab, (args.seq,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * masked + ids[masked:]})
    share = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    proj = Projector("sjlt", [(n, q.numel()) for n, q in named], proj_dim=8192, seed=0)
    plain(model, share[:8], 8, device)  # warm-up
    t_plain, _ = timed(device, lambda: plain(model, share, 16, device))
    t_ours, _ = timed(device, lambda: per_sample_gradient_features(model, share, projector=proj, batch_size=16))
    times = torch.tensor([t_plain, t_ours], device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        t_plain, t_ours = times.tolist()
        what = torch.cuda.get_device_name() if cuda else machine_label()
        context = (
            f"Command: `torchrun --nproc_per_node {world} bench/bench_gpu_features.py --fsdp`. {what} x {world}, "
            f"FSDP2 full_shard, {len(rows)} samples x T {args.seq}, SJLT k 8192, slowest rank."
        )
        results = [("plain forward+backward on the sharded model, bs 16", t_plain), ("ours, SGD, bs 16", t_ours)]
        ratio = f"ours / plain on the sharded model: **{t_ours / t_plain:.2f}**"
        report(args.out, "Gradient features on a sharded model (FSDP2)", context, ["run", "seconds"], results, ratio)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
