"""TrainState: everything needed to continue a run bit for bit, saved atomically.

Layout of a checkpoint directory (safetensors + JSON only, nothing is unpickled):
  trainable.safetensors   trainable weights (LoRA adapter or the full model)
  optimizer.safetensors   optimizer tensors (`state/<param index>/<name>`)
  rng.safetensors         torch CPU / CUDA generator states
  trainer_state.json      step, epoch, counters, log history, optimizer param groups, scheduler,
                          python / numpy RNG, plan and component states
  manifest.json           sha256 of every file, trainable parameter names and shapes (written last)
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dataflex.core.errors import CheckpointError
from dataflex.utils.io import atomic_dir, atomic_write_json, move_into_place, sha256_file

FORMAT = "dataflex-trainstate"
VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"state/{idx}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """Write a checkpoint atomically: a temp dir that is renamed into place only when complete."""
    path = Path(path)
    weights = trainable_tensors(model)
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    # Names of the optimizer's parameters in state-dict order, so moments can be read by name (LESS features).
    names = {id(p): n for n, p in model.named_parameters()}
    opt_meta["param_names"] = [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    rng_tensors, rng_meta = capture_rng()
    state = dict(trainer_state)
    state.update({"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta})
    with atomic_dir(path) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "trainer_state.json", state)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "files": {name: sha256_file(tmp / name) for name in files},
            "trainable": {name: list(t.shape) for name, t in weights.items()},
            "model_fingerprint": trainer_state.get("model_fingerprint"),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return path


def save_sharded_train_state(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    accelerator: Any,
) -> Path:
    """A TrainState of an FSDP2 run: every rank writes its shards of the model and optimizer state (`dcp/`), the
    main process the rest and the manifest; all into one temp dir renamed into place when complete (collective)."""
    from dataflex.distributed.fsdp import save_sharded

    path = Path(path)
    tmp = path.with_name(f".{path.name}.sharded.tmp")  # one name every rank knows without talking
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_sharded(tmp, model, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rng_tensors, rng_meta = capture_rng()
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        atomic_write_json(tmp / "trainer_state.json", state)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "files": {name: sha256_file(tmp / name) for name in files},
            "trainable": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
            "model_fingerprint": trainer_state.get("model_fingerprint"),
            "sharded_processes": accelerator.num_processes,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        move_into_place(tmp, path)
    accelerator.wait_for_everyone()
    return path


def read_manifest(path: str | Path, *, verify_hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint is complete and intact; CheckpointError (one line) otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass an existing checkpoint-<step> directory")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no manifest.json: it is truncated or not a dataflex checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint '{path}': manifest.json is corrupt; use another checkpoint") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{path}' is not a dataflex TrainState (format {manifest.get('format')!r})")
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint '{path}' is truncated: {name} is missing; use another checkpoint")
        if verify_hashes and sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint '{path}' is corrupt: {name} does not match its manifest hash")
    return manifest


def check_compatible(manifest: dict[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """A checkpoint from another model (other trainable names or shapes) is refused before loading."""
    mine = {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    theirs = manifest.get("trainable", {})
    if mine != theirs:
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        shape = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        first = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"shape of {shape[0]}: checkpoint {theirs[shape[0]]} vs model {mine[shape[0]]}"
        )
        raise CheckpointError(
            f"checkpoint '{path}' is from another model ({first}); resume with the same model and finetuning settings"
        )


def check_base(manifest: dict[str, Any], fingerprint: str | None, path: str | Path, allow: bool = False) -> None:
    """A checkpoint of another base model with the same shapes is refused too (its weights would be nonsense on
    this base), unless `allow` (`allow_different_base: true`)."""
    theirs = manifest.get("model_fingerprint")
    if allow or not theirs or not fingerprint or theirs == fingerprint:
        return
    raise CheckpointError(
        f"checkpoint '{path}' was trained on another base model (fingerprint {theirs[:12]} vs {fingerprint[:12]}); "
        "resume with the same model_name_or_path, or set allow_different_base: true"
    )


def load_train_state(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    path = Path(path)
    manifest = read_manifest(path)
    check_compatible(manifest, model, path)
    state = json.loads((path / "trainer_state.json").read_text())
    if manifest.get("sharded_processes"):
        from dataflex.distributed.fsdp import load_sharded

        load_sharded(path, model, optimizer)  # resharded onto however many processes run now
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        # Optimizer.load_state_dict moves each state tensor to its parameter's device as the optimizer needs.
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(optimizer_from_flat(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume_path(resume: str | bool | None, output_dir: str | Path) -> Path | None:
    """`true` / "latest" → newest complete checkpoint under output_dir (None if there is none); a path → that path."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        complete = [p for p in list_checkpoints(output_dir) if (p / "manifest.json").is_file()]
        return complete[-1] if complete else None
    return Path(resume)


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    if not keep:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
