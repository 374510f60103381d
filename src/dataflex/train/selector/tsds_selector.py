"""`tsds`: samples drawn from TSDS's KDE-corrected transport-vs-diversity distribution.

`compute_features` (content-cached at every step): embeddings of pool and target, each target example's `max_K`
nearest pool rows, the KDE density ρ over the retrieved rows (σ = `sigma`, `kde_K` neighbours each, itself
included), and the probabilities (α = `alpha`, C = `C`), stored as safetensors. `select` draws `num_samples`
distinct rows with a private generator seeded by (`seed`, step), identical on every rank and broadcast from rank 0;
if fewer rows have mass than requested, all of them are taken and the rest drawn again (DataFlex crashed).

`probs_path` (DataFlex's parameter): a precomputed `tsds_probs.npy` ([pool size] probabilities, as written by
DataFlex's offline tool or `dataflex-cli offline-select tsds`) is drawn from instead, with no embedding and no
target needed; its length, finiteness and signs are checked against the pool when the selector is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector
from dataflex.distributed.collectives import broadcast_object, cached_for_all, main_process_writes
from dataflex.features.distribution import seeded_draw, tsds_from_neighbors
from dataflex.features.embeddings import EmbeddingSettings, EmbeddingStore
from dataflex.features.neighbors import EXACT_THRESHOLD
from dataflex.utils.io import atomic_write_bytes, sha256_file, sha256_json
from dataflex.utils.logging import logger

from .base_selector import Selector
from .embedding_common import EmbeddingMixin, cached_neighbors, check_file, load_probs, needs_target, positive_int

TSDS_CODE_VERSION = "1"


def _number(key: str, value: Any, low: float, low_open: bool, high: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ConfigError(f"selector 'tsds': {key} must be a number {bound}, got {value!r}")
    return float(value)


@register_selector("tsds")
class TsdsSelector(EmbeddingMixin, Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        eval_dataset: Any = None,
        cache_dir: str | None = None,
        seed: int = 42,
        encoder: str = "all-MiniLM-L6-v2",
        layer: int = -1,
        text: str = "full",
        max_length: int = 256,
        batch_size: int = 32,
        alpha: float = 0.6,
        C: float = 5.0,
        sigma: float = 0.75,
        max_K: int = 5000,
        kde_K: int = 1000,
        exact_threshold: int = EXACT_THRESHOLD,
        tokenizer_path: str | None = None,
        probs_path: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.check_params(locals())
        self.probs_path = probs_path
        self.probs: np.ndarray | None = None
        if probs_path is not None:
            self.probs = load_probs(probs_path, len(dataset))
            self.file_sha256 = sha256_file(Path(probs_path).expanduser())
            self.eval_dataset = eval_dataset  # the queries are baked into the file
            logger.info(
                "tsds: probabilities from %s (support %d of %d rows); embedding settings are not used",
                probs_path,
                int((self.probs > 0).sum()),
                len(self.probs),
            )
        else:
            self.eval_dataset = needs_target("tsds", eval_dataset)
        self.embedding = EmbeddingSettings(
            encoder=encoder, layer=layer, text=text, max_length=max_length, batch_size=batch_size
        )
        self.alpha, self.C, self.sigma = float(alpha), float(C), float(sigma)
        self.max_K, self.kde_K, self.exact_threshold = max_K, kde_K, exact_threshold
        self.tokenizer_path = tokenizer_path

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        _number("alpha", params["alpha"], 0, True, 1)
        _number("C", params["C"], 0, True)
        _number("sigma", params["sigma"], 0, False)
        for key in ("max_K", "kde_K", "exact_threshold"):
            positive_int("tsds", key, params[key])
        check_file("tsds", "probs_path", params.get("probs_path"))

    @property
    def needs_model(self) -> bool:
        return self.probs is None and super().needs_model

    def state_dict(self) -> dict[str, Any]:
        # The file's content joins the run's selection key: a regenerated file at the same path is not reused.
        return {"probs_sha256": self.file_sha256} if self.probs is not None else {}

    def compute_features(
        self, model: torch.nn.Module | None, step_id: int, *, base_model_id: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        if self.probs is not None:
            return {"probs_path": str(self.probs_path), "sha256": self.file_sha256, "cache_hit": True}
        pool, target = self.embed_pool_and_target(model, step_id, base_model_id, kwargs)
        nref, dist, idx = cached_neighbors(self._root(), pool, target, self.max_K, self.exact_threshold)
        key = sha256_json(
            {
                "neighbors": nref["key"],
                "alpha": self.alpha,
                "C": self.C,
                "sigma": self.sigma,
                "kde_K": self.kde_K,
                "version": TSDS_CODE_VERSION,
            }
        )
        path = self._root() / "tsds" / f"{key[:32]}.safetensors"
        status = "hit"
        if not cached_for_all(path):
            status = "computed"
            n = len(self.dataset)
            probs, info = tsds_from_neighbors(
                EmbeddingStore.load(pool),
                dist,
                idx,
                alpha=self.alpha,
                C=self.C,
                sigma=self.sigma,
                kde_K=self.kde_K,
                exact_threshold=self.exact_threshold,
            )
            logger.info(
                "tsds: support %d of %d rows, level %.3g, mean radius %.1f neighbours",
                info["support"],
                n,
                info["level"],
                info["mean_radius"],
            )
            with main_process_writes() as writer:
                if writer:
                    atomic_write_bytes(
                        path,
                        save(
                            {"probs": torch.from_numpy(probs).contiguous()},
                            metadata={"key": key, **{k: str(v) for k, v in info.items()}},
                        ),
                    )
        return {
            "pool": pool,
            "target": target,
            "neighbors": nref,
            "probs": {"path": str(path), "key": key},
            "cache_hit": pool["status"] == target["status"] == nref["status"] == status == "hit",
        }

    def select(self, model: torch.nn.Module | None, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        if self.probs is not None:
            probs = self.probs
        else:
            feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
            probs = load_file(feats["probs"]["path"])["probs"].numpy()
        if len(probs) != len(self.dataset):
            raise ConfigError(f"tsds probabilities cover {len(probs)} rows but the pool has {len(self.dataset)}")
        picked = seeded_draw(probs, num_samples, seed=self.seed * 1_000_003 + int(step_id))
        self.last_metric = {"support": int((probs > 0).sum()), "selected_mass": float(probs[picked].sum())}
        return broadcast_object(self.accelerator, picked)  # rank 0's choice everywhere
