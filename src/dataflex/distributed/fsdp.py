"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training loop, on CPU (gloo) and GPU (NCCL) alike, and
the sharded TrainState it needs (`torch.distributed.checkpoint`).

Why `fully_shard` directly and not accelerate's FSDP plugin: accelerate 1.x routes FSDP through its CUDA-oriented
launcher and plugin state, while `fully_shard` is one call per module that really shards on a gloo process group
(each rank holds 1/world of every parameter, gradient and Adam moment). The loop stays the same: forward,
backward (reduce-scatter), clip (DTensor norms), step.

Settings (`train.fsdp`, HF / LLaMA-Factory's string form, and `train.fsdp_config`):
  full_shard     parameters resharded after each layer's forward (ZeRO-3)
  shard_grad_op  parameters kept gathered between forward and backward (ZeRO-2: sharded grads and optimizer)
  offload        parameters, gradients and optimizer state on CPU (`CPUOffloadPolicy`)
  auto_wrap      accepted: each decoder layer (`fsdp_config.transformer_layer_cls_to_wrap`, default: the
                 model's `_no_split_modules`) is sharded as one unit, then the root
A DeepSpeed JSON (`deepspeed:`) maps onto these: ZeRO-3 -> full_shard, ZeRO-2/1 -> shard_grad_op, ZeRO-0 -> DDP,
`offload_param` / `offload_optimizer` -> offload (see `settings_from_deepspeed`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataflex.core.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the config layer parses these settings before any model
    import torch

STRATEGIES = ("full_shard", "shard_grad_op")
OPTIONS = (*STRATEGIES, "offload", "auto_wrap", "no_shard")
DCP_DIR = "dcp"  # the sharded model + optimizer state inside a TrainState


@dataclass(frozen=True)
class FsdpSettings:
    strategy: str = "full_shard"
    offload: bool = False
    wrap_classes: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list, compare=False)


def parse_fsdp(fsdp: str | list[str] | None, fsdp_config: dict[str, Any] | None = None) -> FsdpSettings | None:
    """HF's `fsdp: "full_shard auto_wrap offload"` (+ `fsdp_config`) -> settings; None when FSDP is off."""
    if not fsdp:
        return None
    words = fsdp.split() if isinstance(fsdp, str) else [str(w) for w in fsdp]
    unknown = [w for w in words if w not in OPTIONS]
    if unknown:
        raise ConfigError(f"train.fsdp: unknown option(s) {', '.join(unknown)}; use {', '.join(OPTIONS)}")
    if "no_shard" in words:
        raise ConfigError("train.fsdp: no_shard is plain data parallelism; unset fsdp (DDP is the default)")
    chosen = [w for w in words if w in STRATEGIES]
    if len(chosen) > 1:
        raise ConfigError(f"train.fsdp: choose one of {', '.join(STRATEGIES)}, got {', '.join(chosen)}")
    cfg = dict(fsdp_config or {})
    wrap = cfg.pop("transformer_layer_cls_to_wrap", None) or []
    wrap = [wrap] if isinstance(wrap, str) else list(wrap)
    if cfg:
        raise ConfigError(
            f"train.fsdp_config: unsupported key(s) {', '.join(sorted(cfg))}; supported: transformer_layer_cls_to_wrap"
        )
    return FsdpSettings(chosen[0] if chosen else "full_shard", "offload" in words, tuple(wrap))


def settings_from_deepspeed(path: str | os.PathLike) -> FsdpSettings | None:
    """A DeepSpeed JSON (DataFlex's / LLaMA-Factory's ds_z{0,2,3}[_offload]_config.json) as FSDP2 settings, with
    the mapping and the keys that have no equivalent in `notes`; None for ZeRO-0 (that is DDP)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed file {path} is not valid JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"deepspeed file {path} must hold a JSON object")
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed file {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 0:
        return None
    offload = any(
        (zero.get(k) or {}).get("device", "none") not in ("none", None) for k in ("offload_param", "offload_optimizer")
    )
    strategy = "full_shard" if stage == 3 else "shard_grad_op"
    # What a ZeRO JSON says that FSDP2 does itself, or that the run's own keys already set (batch, precision).
    covered = {
        "zero_optimization",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero_allow_untested_optimizer",
        "fp16",
        "bf16",
        "steps_per_print",
        "wall_clock_breakdown",
    }
    zero_covered = {
        "stage",
        "offload_param",
        "offload_optimizer",
        "overlap_comm",
        "contiguous_gradients",
        "reduce_scatter",
        "allgather_partitions",
        "round_robin_gradients",
        "sub_group_size",
        "reduce_bucket_size",
        "allgather_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "stage3_gather_16bit_weights_on_model_save",
    }
    ignored = sorted(set(cfg) - covered) + sorted(f"zero_optimization.{k}" for k in set(zero) - zero_covered)
    note = f"deepspeed {Path(path).name}: ZeRO-{stage} -> FSDP2 {strategy}{' + CPU offload' if offload else ''}"
    if ignored:
        note += f" (no equivalent, ignored: {', '.join(ignored)})"
    return FsdpSettings(strategy, offload, (), [note])


def shard_model(model: torch.nn.Module, settings: FsdpSettings) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root, over all processes (gloo on CPU, NCCL on GPU). Call it
    before the optimizer is built: FSDP2 replaces the parameters by DTensor shards."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ConfigError("train.fsdp shards across processes: set num_processes >= 2 (or unset fsdp for DDP)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    wrap = set(settings.wrap_classes) or set(getattr(model, "_no_split_modules", None) or ())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: its transformers model
    wrap = wrap or set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in wrap]
    if not layers:
        raise ConfigError(
            f"train.fsdp: no module of class {', '.join(sorted(wrap)) or '(none given)'} in {type(base).__name__}; "
            "set fsdp_config.transformer_layer_cls_to_wrap to its decoder layer class"
        )
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": settings.strategy == "full_shard"}
    if settings.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered (collective: all processes call it); the full tensors on CPU, on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state of every rank into `path/dcp` (each rank writes its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / DCP_DIR))


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore `path/dcp` into `model` / `optimizer`, whatever their sharding now: DCP reshards a checkpoint of N
    processes onto M (or onto one unsharded process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / DCP_DIR / ".metadata").is_file():
        raise CheckpointError(f"checkpoint '{path}' is sharded but {DCP_DIR}/.metadata is missing: it is incomplete")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    except Exception as exc:  # a missing rank file, or shapes of another model: one line, nothing half-applied
        raise CheckpointError(
            f"sharded checkpoint '{path}' cannot be loaded: {' '.join(str(exc).split())[:300]}"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def fsdp_settings(args: Any) -> FsdpSettings | None:
    """The run's FSDP2 settings: `train.fsdp`, else a DeepSpeed JSON's equivalent when several processes train
    (one process has nothing to shard); None for DDP."""
    settings = parse_fsdp(args.fsdp, args.fsdp_config)
    if settings is None and args.deepspeed and int(args.num_processes) > 1:
        settings = settings_from_deepspeed(args.deepspeed)
    return settings


def read_sharded(path: Path, shapes: dict[str, list[int]], kind: str) -> dict[str, torch.Tensor]:
    """Whole tensors from a sharded TrainState without a process group (DCP reassembles the shards): `kind` "model"
    reads parameters `{name: shape}`; "exp_avg" / "exp_avg_sq" read those Adam moments of the same parameters."""
    import torch
    import torch.distributed.checkpoint as dcp

    if kind == "model":
        state: dict[str, Any] = {"model": {n: torch.empty(s) for n, s in shapes.items()}}
    else:
        state = {"optimizer": {"state": {n: {kind: torch.empty(s)} for n, s in shapes.items()}}}
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    except Exception as exc:  # a missing rank file or other shapes: one line
        raise CheckpointError(
            f"sharded checkpoint '{path}' cannot be read: {' '.join(str(exc).split())[:300]}"
        ) from None
    if kind == "model":
        return state["model"]
    return {n: entry[kind] for n, entry in state["optimizer"]["state"].items()}
