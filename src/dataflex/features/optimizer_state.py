"""Adam moments for LESS's Adam features, from whichever form the user has them in.

Accepted: a mapping {parameter name: {"exp_avg", "exp_avg_sq"}}, a live torch optimizer (moments read per
parameter object, betas/eps from its param group), or a saved TrainState directory (moments by name, betas/eps
from the saved param groups). Names are those of `model.named_parameters()`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataflex.core.errors import ConfigError


@dataclass
class AdamMoments:
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (exp_avg, exp_avg_sq), fp32
    betas: tuple[float, float]
    eps: float


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A moment as one fp32 tensor: FSDP2 keeps each rank's shard (a DTensor); the per-sample transform needs the
    whole parameter's (gathered once per extraction; every rank calls this in the same order)."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).float()


def _from_optimizer(opt: torch.optim.Optimizer, model: torch.nn.Module) -> AdamMoments:
    names = {id(p): n for n, p in model.named_parameters()}
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    betas, eps = None, None
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            if id(p) in names and "exp_avg" in state:
                moments[names[id(p)]] = (_whole(state["exp_avg"]), _whole(state["exp_avg_sq"]))
                betas, eps = tuple(group["betas"]), float(group["eps"])
    if betas is None:
        raise ConfigError("the optimizer has no Adam moments yet (it has not stepped); train at least one step first")
    return AdamMoments(moments, betas, eps)  # type: ignore[arg-type]


def _from_train_state(path: Path) -> AdamMoments:
    from safetensors.torch import load_file

    from dataflex.train.trainer.state import read_manifest

    manifest = read_manifest(path)
    if manifest.get("sharded_processes"):  # an FSDP2 run's TrainState: the moments are DCP shards
        from dataflex.distributed.fsdp import read_sharded

        args = json.loads((path / "trainer_state.json").read_text())["args"]
        shapes = manifest["trainable"]
        m, v = read_sharded(path, shapes, "exp_avg"), read_sharded(path, shapes, "exp_avg_sq")
        betas = (float(args["adam_beta1"]), float(args["adam_beta2"]))
        return AdamMoments({n: (m[n].float(), v[n].float()) for n in shapes}, betas, float(args["adam_epsilon"]))
    meta = json.loads((path / "trainer_state.json").read_text())["optimizer"]
    names = meta.get("param_names")
    if not names:
        raise ConfigError(f"TrainState '{path}' does not record optimizer parameter names; save it with this version")
    tensors = load_file(str(path / "optimizer.safetensors"))
    moments = {}
    for idx, name in enumerate(names):
        m, v = tensors.get(f"state/{idx}/exp_avg"), tensors.get(f"state/{idx}/exp_avg_sq")
        if m is not None and v is not None:
            moments[name] = (m.float(), v.float())
    group = meta["param_groups"][0]
    return AdamMoments(moments, tuple(group["betas"]), float(group["eps"]))  # type: ignore[arg-type]


def resolve_adam_state(
    optimizer_state: Any, model: torch.nn.Module, *, betas: tuple[float, float] | None = None, eps: float | None = None
) -> AdamMoments:
    """Normalise `optimizer_state` to AdamMoments; explicit `betas` / `eps` override what the state carries."""
    if optimizer_state is None:
        raise ConfigError("gradient_type 'adam' needs optimizer_state (Adam moments, an optimizer or a TrainState)")
    if isinstance(optimizer_state, AdamMoments):
        found = optimizer_state
    elif isinstance(optimizer_state, torch.optim.Optimizer):
        found = _from_optimizer(optimizer_state, model)
    elif isinstance(optimizer_state, (str, Path)):
        found = _from_train_state(Path(optimizer_state))
    elif isinstance(optimizer_state, Mapping):
        moments = {}
        for name, st in optimizer_state.items():
            if not isinstance(st, Mapping) or "exp_avg" not in st or "exp_avg_sq" not in st:
                raise ConfigError(f"optimizer_state['{name}'] needs 'exp_avg' and 'exp_avg_sq' tensors")
            moments[name] = (torch.as_tensor(st["exp_avg"]).float(), torch.as_tensor(st["exp_avg_sq"]).float())
        found = AdamMoments(moments, (0.9, 0.999), 1e-8)
    else:
        raise ConfigError(
            f"optimizer_state of type {type(optimizer_state).__name__} is not supported; pass a mapping "
            "of Adam moments by parameter name, a torch optimizer or a TrainState directory"
        )
    if betas is not None:
        found = AdamMoments(found.moments, tuple(betas), found.eps)  # type: ignore[arg-type]
    if eps is not None:
        found = AdamMoments(found.moments, found.betas, float(eps))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name not in found.moments:
            raise ConfigError(
                f"optimizer_state has no Adam moments for trainable parameter '{name}'; "
                "use the optimizer state saved with these weights"
            )
        m, v = found.moments[name]
        if m.shape != p.shape or v.shape != p.shape:
            raise ConfigError(f"Adam moments of '{name}' have shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
    return found


def adam_transform(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, betas: tuple[float, float], eps: float, placement: str = "inside"
) -> torch.Tensor:
    """LESS's Adam feature of per-sample gradients g [B, n] given flat moments m, v [n] (no bias correction).

    inside (LESS): (β1·m + (1−β1)·g) / sqrt(β2·v + (1−β2)·g² + ε); outside (DataFlex): ... / (sqrt(...) + ε).
    """
    b1, b2 = betas
    return adam_transform_scaled(g, b1 * m, b2 * v, betas, eps, placement)


def adam_transform_scaled(
    g: torch.Tensor,
    b1_m: torch.Tensor,
    b2_v: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    placement: str = "inside",
) -> torch.Tensor:
    """`adam_transform` with β1·m and β2·v precomputed; five passes over [B, n] (it runs once per parameter and
    batch inside the backward pass, where ten separate elementwise ops showed up in profiles)."""
    if placement not in ("inside", "outside"):
        raise ConfigError(f"adam_eps_placement must be 'inside' (LESS) or 'outside' (DataFlex), got {placement!r}")
    b1, b2 = betas
    num = torch.add(b1_m, g, alpha=1 - b1)
    den = torch.addcmul(b2_v, g, g, value=1 - b2)
    if placement == "inside":
        den.add_(eps).sqrt_()
    else:
        den.sqrt_().add_(eps)
    return num.div_(den)
