"""The gradient datastore: content-addressed, sharded, resumable per-sample features.

Layout under the root (`data/04_feature` by default):

  <state key>/                     one model state + feature settings (adapter weights, base model id, Adam
    <dataset key>/                 moments for adam, every feature setting, the feature code version)
      samples.json                 per-sample content hashes (input_ids + labels), written first
      shard-00000.safetensors      features [n, k] (unnormalised), norms [n], rows [n] (row in the dataset)
      manifest.json                key fields, shard list with sha256, `complete` (rewritten after each shard)

Every file is written to a temp file and renamed. A run that is killed keeps its completed shards; the next
run with the same key computes only the missing ones. A dataset that shares samples with an already stored
one (same state key) copies those rows instead of recomputing them. Anything in the key that changes is a
miss: a new directory, never a silent reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.distributed.tensor import DTensor

from dataflex.core.errors import ConfigError, DataError
from dataflex.distributed.collectives import (
    barrier,
    broadcast_object,
    current_accelerator,
    gather_varlen,
    is_main,
    rank_block,
)
from dataflex.features.gradients import (
    FEATURE_DTYPES,
    GRADIENT_TYPES,
    _as_rows,
    per_sample_gradient_features,
    trainable_parameters,
)
from dataflex.features.optimizer_state import resolve_adam_state
from dataflex.features.projectors import PROJECTORS
from dataflex.utils.io import atomic_write_bytes, atomic_write_json, remove_stale_temp, sha256_file, sha256_json
from dataflex.utils.lock import RunLock
from dataflex.utils.logging import logger

# Bump when a change to the feature code changes the numbers it produces: every stored key becomes a miss.
FEATURE_CODE_VERSION = "1"
FORMAT = "dataflex-gradient-features"


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that determines a feature except the model state and the samples."""

    gradient_type: str = "sgd"
    projector: str = "sjlt"
    proj_dim: int = 8192
    seed: int = 0
    adam_eps_placement: str = "inside"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.gradient_type not in GRADIENT_TYPES:
            raise ConfigError(f"gradient_type must be one of {', '.join(GRADIENT_TYPES)}, got {self.gradient_type!r}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        if self.adam_eps_placement not in ("inside", "outside"):
            raise ConfigError(f"adam_eps_placement must be 'inside' or 'outside', got {self.adam_eps_placement!r}")
        if self.dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be an integer >= 1, got {self.proj_dim!r}")

    def for_targets(self) -> FeatureSettings:
        """The same projection for target examples, with SGD gradients (LESS's rule: no Adam state for targets)."""
        return replace(self, gradient_type="sgd")


@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, k] unnormalised, rows in dataset order
    norms: torch.Tensor  # [N]
    manifest: dict[str, Any]
    path: Path

    def normalized(self) -> torch.Tensor:
        return self.features.float() / self.norms.float().clamp(min=1e-12).unsqueeze(1)


def _digest(h: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if isinstance(t, DTensor):  # a parameter sharded by FSDP2: hash the whole tensor (every rank gathers)
        t = t.full_tensor()
    t = t.contiguous().cpu()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_state_fingerprint(model: torch.nn.Module, base_model_id: str | None = None) -> str:
    """Hash of the trainable tensors (names, shapes, bytes) and the frozen base's identity.

    Without `base_model_id` (e.g. `dataflex.models.model_fingerprint(path)`) every parameter is hashed."""
    h = hashlib.sha256()
    named = sorted(trainable_parameters(model), key=lambda x: x[0])
    for name, p in named:
        h.update(name.encode())
        _digest(h, p)
    if base_model_id is None:
        for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
            if not p.requires_grad:
                h.update(name.encode())
                _digest(h, p)
    else:
        h.update(f"base:{base_model_id}".encode())
    return h.hexdigest()


def sample_hashes(dataset: Any) -> list[str]:
    """Per-sample content hash of (input_ids, labels): what a feature depends on besides the model."""
    ids, labels = _as_rows(dataset)
    out = []
    for a, b in zip(ids, labels):
        h = hashlib.blake2b(digest_size=16)
        h.update(torch.tensor(a, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
        h.update(torch.tensor(b, dtype=torch.int64).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class GradientDatastore:
    """Computes per-sample features once per (model state, samples, settings) and serves them afterwards."""

    def __init__(self, root: str | Path, shard_size: int = 1024) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"datastore shard_size must be an integer >= 1, got {shard_size!r}")
        self.root = Path(root)
        self.shard_size = shard_size

    def key_fields(
        self,
        model: torch.nn.Module,
        settings: FeatureSettings,
        *,
        base_model_id: str | None,
        optimizer_state: Any = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "model": model_state_fingerprint(model, base_model_id),
            "trainable": [[n, list(p.shape)] for n, p in trainable_parameters(model)],
            "settings": asdict(settings),
            "code_version": FEATURE_CODE_VERSION,
        }
        if settings.gradient_type == "adam":
            adam = resolve_adam_state(optimizer_state, model)
            h = hashlib.sha256()
            for name in sorted(adam.moments):
                h.update(name.encode())
                _digest(h, adam.moments[name][0])
                _digest(h, adam.moments[name][1])
            fields["adam"] = {"moments": h.hexdigest(), "betas": list(adam.betas), "eps": adam.eps}
        return fields

    def extract(
        self,
        model: torch.nn.Module,
        dataset: Any,
        settings: FeatureSettings,
        *,
        base_model_id: str | None = None,
        optimizer_state: Any = None,
        batch_size: int = 16,
        name: str | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Features of every sample of `dataset`, computed or reused; returns a JSON-able reference."""
        start = time.perf_counter()
        if settings.gradient_type == "adam":  # read the moments once (a TrainState is a file), not per shard
            optimizer_state = resolve_adam_state(optimizer_state, model)
        fields = self.key_fields(model, settings, base_model_id=base_model_id, optimizer_state=optimizer_state)
        state_key = sha256_json(fields)
        hashes = sample_hashes(dataset)
        if not hashes:
            raise DataError(f"datastore: dataset {name or ''} is empty; nothing to extract".replace("  ", " "))
        dataset_key = sha256_json(hashes)
        path = self.root / state_key[:24] / dataset_key[:24]
        # Launched workers (dataflex.distributed): the main process decides what is done and writes; every
        # process computes a contiguous share of each shard's missing rows, merged in row order.
        acc = current_accelerator()
        with contextlib.ExitStack() as held:
            if is_main(acc):
                # Two runs may fill one entry at once: the second waits, then finds the first's shards done; under
                # the lock a temp file can only be a killed write's, so it goes.
                held.enter_context(RunLock(path, wait=True))
                if remove_stale_temp(path):
                    logger.info("gradient datastore: removed the unfinished files of an interrupted write in %s", path)
            manifest, done = broadcast_object(
                acc, self._open(path, state_key, dataset_key, fields, name, hashes) if is_main(acc) else None
            )
            shard_size = manifest["shard_size"]
            n_shards = -(-len(hashes) // shard_size)
            todo = [s for s in range(n_shards) if s not in done]
            computed = reused = 0
            if todo:
                donors = self._donors(path, state_key)
                for s in todo:
                    lo, hi = s * shard_size, min((s + 1) * shard_size, len(hashes))
                    feats, c, r = self._compute_shard(
                        model,
                        dataset,
                        hashes,
                        lo,
                        hi,
                        settings,
                        donors,
                        optimizer_state,
                        batch_size,
                        progress and is_main(acc),
                        acc,
                    )
                    computed, reused = computed + c, reused + r
                    if not is_main(acc):
                        continue
                    write_shard(path, manifest, s, lo, feats, n_shards)
                barrier(acc)  # nobody reads the store before the main process finished writing it
                manifest = broadcast_object(acc, manifest)
        status = "hit" if not todo else ("resumed" if done else ("reused" if computed == 0 else "computed"))
        seconds = time.perf_counter() - start
        logger.info(
            "gradient datastore %s: %s (%d samples, %d computed, %d reused from other datasets, %.1fs) at %s",
            name or "",
            status,
            len(hashes),
            computed,
            reused,
            seconds,
            path,
        )
        return {
            "path": str(path),
            "state_key": state_key,
            "dataset_key": dataset_key,
            "name": name,
            "num_samples": len(hashes),
            "dim": manifest["dim"],
            "status": status,
            "computed_samples": computed,
            "reused_samples": reused,
            "seconds": seconds,
            "settings": asdict(settings),
        }

    def _open(
        self, path: Path, state_key: str, dataset_key: str, fields: dict[str, Any], name: str | None, hashes: list[str]
    ) -> tuple[dict[str, Any], set[int]]:
        """(manifest, shards already done and intact) of the store at `path`, started afresh when absent."""
        manifest = _read_json(path / "manifest.json")
        if manifest is None or manifest.get("state_key") != state_key or manifest.get("dataset_key") != dataset_key:
            manifest = {
                "format": FORMAT,
                "state_key": state_key,
                "dataset_key": dataset_key,
                "key_fields": fields,
                "name": name,
                "num_samples": len(hashes),
                "shard_size": self.shard_size,
                "dim": None,
                "shards": {},
                "complete": False,
            }
            atomic_write_json(path / "samples.json", hashes, indent=None)
        return manifest, {int(k) for k, v in manifest["shards"].items() if self._shard_ok(path, v)}

    @staticmethod
    def _shard_ok(path: Path, entry: dict[str, Any]) -> bool:
        file = path / entry["file"]
        return file.is_file() and sha256_file(file) == entry["sha256"]

    def _donors(self, path: Path, state_key: str) -> dict[str, tuple[Path, int]]:
        """hash -> (store, row) over the complete stores of the same model state and settings."""
        found: dict[str, tuple[Path, int]] = {}
        parent = path.parent
        if not parent.is_dir():
            return found
        for other in sorted(parent.iterdir()):
            if other == path or not other.is_dir():
                continue
            m = _read_json(other / "manifest.json")
            hashes = _read_json(other / "samples.json")
            if not m or not m.get("complete") or m.get("state_key") != state_key or not isinstance(hashes, list):
                continue
            for row, h in enumerate(hashes):
                found.setdefault(h, (other, row))
        return found

    def _compute_shard(
        self,
        model: torch.nn.Module,
        dataset: Any,
        hashes: list[str],
        lo: int,
        hi: int,
        settings: FeatureSettings,
        donors: dict[str, tuple[Path, int]],
        optimizer_state: Any,
        batch_size: int,
        progress: bool,
        acc: Any = None,
    ) -> tuple[torch.Tensor, int, int]:
        rows = list(range(lo, hi))
        from_donor = [i for i in rows if hashes[i] in donors]
        compute = [i for i in rows if hashes[i] not in donors]
        parts: dict[int, torch.Tensor] = {}
        if compute:
            mine = [compute[j] for j in rank_block(len(compute), acc)]
            feats = torch.zeros(0, self._dim(model, settings), dtype=FEATURE_DTYPES[settings.dtype])
            if mine:
                subset = dataset.select(mine) if hasattr(dataset, "select") else [dataset[i] for i in mine]
                feats = per_sample_gradient_features(
                    model,
                    subset,
                    gradient_type=settings.gradient_type,
                    optimizer_state=optimizer_state,
                    projector=settings.projector,
                    proj_dim=settings.proj_dim,
                    seed=settings.seed,
                    batch_size=batch_size,
                    adam_eps_placement=settings.adam_eps_placement,
                    dtype=settings.dtype,
                    progress=progress,
                )
            parts.update(zip(compute, gather_varlen(acc, feats)))
        if from_donor:
            parts.update(zip(from_donor, _read_rows([donors[hashes[i]] for i in from_donor])))
        return torch.stack([parts[i] for i in rows]), len(compute), len(from_donor)

    @staticmethod
    def _dim(model: torch.nn.Module, settings: FeatureSettings) -> int:
        if settings.projector == "none":
            return sum(p.numel() for _, p in trainable_parameters(model))
        return int(settings.proj_dim)

    @staticmethod
    def load(ref: str | Path | dict[str, Any]) -> FeatureSet:
        """All features of a complete store (a path or an `extract` reference), rows in dataset order."""
        path = Path(ref["path"] if isinstance(ref, dict) else ref)
        manifest = store_manifest(path)
        parts = list(iter_shards(path))
        return FeatureSet(torch.cat([f for _, f, _ in parts]), torch.cat([n for _, _, n in parts]), manifest, path)


def write_shard(path: Path, manifest: dict[str, Any], s: int, lo: int, feats: torch.Tensor, n_shards: int) -> None:
    """Shard `s` (rows lo.. of the dataset) and then the manifest that lists it, each atomically: a kill between
    the two leaves a shard the manifest does not trust yet (recomputed on resume)."""
    file = f"shard-{s:05d}.safetensors"
    hi = lo + feats.shape[0]
    data = save(
        {
            "features": feats.contiguous(),
            "norms": feats.float().norm(dim=1),
            "rows": torch.arange(lo, hi, dtype=torch.int64),
        },
        metadata={"state_key": manifest["state_key"], "dataset_key": manifest["dataset_key"]},
    )
    atomic_write_bytes(path / file, data)
    manifest["shards"][str(s)] = {"file": file, "rows": [lo, hi], "sha256": sha256_file(path / file)}
    manifest["dim"] = int(feats.shape[1])
    manifest["complete"] = len(manifest["shards"]) == n_shards
    atomic_write_json(path / "manifest.json", manifest)


def iter_shards(ref: str | Path | dict[str, Any]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first row, features, norms) of each shard of a complete store, in row order, one shard in memory at a time:
    what bounded-memory matching streams."""
    path = Path(ref["path"] if isinstance(ref, dict) else ref)
    manifest = store_manifest(path)
    for s in sorted(manifest["shards"], key=int):
        entry = manifest["shards"][s]
        with safe_open(str(path / entry["file"]), framework="pt") as f:
            yield int(entry["rows"][0]), f.get_tensor("features"), f.get_tensor("norms")


def store_manifest(ref: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The manifest of a complete store (a path or an `extract` reference); one line if it is not one."""
    path = Path(ref["path"] if isinstance(ref, dict) else ref)
    manifest = _read_json(path / "manifest.json")
    if not manifest or manifest.get("format") != FORMAT:
        raise DataError(f"'{path}' is not a gradient feature store (no valid manifest.json); re-run the extraction")
    if not manifest.get("complete"):
        raise DataError(f"feature store '{path}' is incomplete (an extraction was interrupted); re-run to finish")
    return manifest


def _read_rows(locations: Sequence[tuple[Path, int]]) -> list[torch.Tensor]:
    """Rows of other stores, reading each shard once."""
    by_file: dict[Path, list[tuple[int, int]]] = {}
    manifests: dict[Path, dict[str, Any]] = {}
    for pos, (store, row) in enumerate(locations):
        if store not in manifests:
            manifests[store] = _read_json(store / "manifest.json") or {}
        m = manifests[store]
        size = m.get("shard_size", 1)
        entry = m["shards"][str(row // size)]
        by_file.setdefault(store / entry["file"], []).append((pos, row - entry["rows"][0]))
    out: list[torch.Tensor | None] = [None] * len(locations)
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            feats = f.get_tensor("features")
        for pos, local in wanted:
            out[pos] = feats[local]
    return out  # type: ignore[return-value]
