"""`cluster_less` (ClusterLESS): LESS scores for clusters of the pool.

`compute_features`: pool embeddings (default: mean hidden states of the current model; any encoder of
`dataflex.features.embeddings`), k-means with k-means++ init and tolerance `kmeans_tol` (cached by the embeddings'
content key, so a changed model re-clusters instead of reusing stale ids), the `representatives` rows nearest to
each centroid, and LESS features (Adam for the representatives, SGD for the target) through the gradient
datastore. `select`: cluster vector = normalised mean of its representatives' normalised features, cluster score =
its cosine with the target aggregated like `less`; clusters in score order give at most
ceil(`max_cluster_share` · budget) rows each per pass, most central first, so one huge cluster cannot take the
whole budget (DataFlex filled whole clusters, the last one in arbitrary order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector
from dataflex.distributed.collectives import broadcast_object, cached_for_all, main_process_writes
from dataflex.features import FeatureSettings, GradientDatastore
from dataflex.features.clustering import kmeans, ranked_members, spread_budget
from dataflex.features.embeddings import EmbeddingSettings, EmbeddingStore
from dataflex.features.matching import AGGREGATIONS, aggregate, normalize_rows
from dataflex.utils.io import atomic_write_bytes, sha256_json
from dataflex.utils.logging import logger

from .base_selector import Selector
from .embedding_common import EmbeddingMixin, fill_to, needs_target, positive_int

CLUSTER_CODE_VERSION = "1"


@register_selector("cluster_less")
class ClusterLessSelector(EmbeddingMixin, Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        eval_dataset: Any = None,
        cache_dir: str | None = None,
        seed: int = 42,
        encoder: str = "model",
        layer: int = -1,
        text: str = "full",
        max_length: int = 256,
        embedding_batch_size: int = 32,
        n_clusters: int = 32,
        representatives: int = 4,
        kmeans_tol: float = 1e-4,
        kmeans_max_iter: int = 300,
        max_cluster_share: float = 0.5,
        gradient_type: str = "adam",
        proj_dim: int = 8192,
        projector: str = "sjlt",
        adam_eps_placement: str = "inside",
        aggregation: str = "mean",
        batch_size: int = 16,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.eval_dataset = needs_target("cluster_less", eval_dataset)
        self.embedding = EmbeddingSettings(
            encoder=encoder, layer=layer, text=text, max_length=max_length, batch_size=embedding_batch_size
        )
        self.check_params(locals())
        self.n_clusters, self.representatives, self.kmeans_max_iter = n_clusters, representatives, kmeans_max_iter
        self.kmeans_tol, self.max_cluster_share, self.aggregation = (
            float(kmeans_tol),
            float(max_cluster_share),
            aggregation,
        )
        self.settings = FeatureSettings(
            gradient_type=gradient_type,
            projector=projector,
            proj_dim=int(proj_dim),
            seed=int(seed),
            adam_eps_placement=adam_eps_placement,
        )
        self.target_settings = self.settings.for_targets()
        self.batch_size = positive_int("cluster_less", "batch_size", batch_size)
        self.tokenizer_path = tokenizer_path

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        for key in ("n_clusters", "representatives", "kmeans_max_iter"):
            positive_int("cluster_less", key, params[key])
        tol, share = params["kmeans_tol"], params["max_cluster_share"]
        if isinstance(tol, bool) or not isinstance(tol, int | float) or tol < 0:
            raise ConfigError(f"selector 'cluster_less': kmeans_tol must be a number >= 0, got {tol!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not (0 < share <= 1):
            raise ConfigError(f"selector 'cluster_less': max_cluster_share must be in (0, 1], got {share!r}")
        if params["aggregation"] not in AGGREGATIONS:
            raise ConfigError(f"selector 'cluster_less': aggregation must be one of {', '.join(AGGREGATIONS)}")

    @property
    def needs_model(self) -> bool:
        return True  # LESS features of the representatives

    def clusters(self, pool_ref: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """(ref, labels, centroids), cached under `<cache_dir>/clusters` by the embeddings' key and the settings."""
        key = sha256_json(
            {
                "embeddings": pool_ref["key"],
                "n_clusters": self.n_clusters,
                "seed": self.seed,
                "tol": self.kmeans_tol,
                "max_iter": self.kmeans_max_iter,
                "version": CLUSTER_CODE_VERSION,
            }
        )
        path = self._root() / "clusters" / f"{key[:32]}.safetensors"
        if cached_for_all(path):
            t = load_file(str(path))
            return {"path": str(path), "key": key, "status": "hit"}, t["labels"].numpy(), t["centroids"].numpy()
        labels, centroids = kmeans(
            EmbeddingStore.load(pool_ref),
            self.n_clusters,
            seed=self.seed,
            tol=self.kmeans_tol,
            max_iter=self.kmeans_max_iter,
        )
        tensors = {
            "labels": torch.from_numpy(labels).contiguous(),
            "centroids": torch.from_numpy(centroids).contiguous(),
        }
        with main_process_writes() as writer:
            if writer:
                atomic_write_bytes(path, save(tensors, metadata={"key": key}))
        sizes = np.bincount(labels, minlength=len(centroids))
        logger.info("cluster_less: %d clusters (sizes %d..%d)", len(centroids), sizes.min(), sizes.max())
        return {"path": str(path), "key": key, "status": "computed"}, labels, centroids

    def compute_features(
        self,
        model: torch.nn.Module,
        step_id: int,
        *,
        optimizer: Any = None,
        optimizer_state: Any = None,
        base_model_id: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if model is None:
            raise ConfigError("selector 'cluster_less' needs the training model (LESS features)")
        moments = optimizer if optimizer is not None else optimizer_state
        if self.settings.gradient_type == "adam" and moments is None:
            raise ConfigError(
                "selector 'cluster_less' with gradient_type adam needs the run's optimizer state "
                "(or set gradient_type: sgd)"
            )
        tok, tok_id = self._tokenizer(model, kwargs)
        pool = EmbeddingStore(self._root() / "embeddings").embed(
            self.dataset,
            self.embedding,
            model=model,
            tokenizer=tok,
            base_model_id=base_model_id,
            tokenizer_id=tok_id,
            name=f"pool@step-{step_id}",
            progress=True,
        )
        cref, labels, centroids = self.clusters(pool)
        members = ranked_members(EmbeddingStore.load(pool), labels, centroids)
        reps = [i for m in members for i in m[: self.representatives]]
        store = GradientDatastore(self._root() / "datastore")
        rep_ref = store.extract(
            model,
            self.dataset.select(reps),
            self.settings,
            base_model_id=base_model_id,
            optimizer_state=moments if self.settings.gradient_type == "adam" else None,
            batch_size=self.batch_size,
            name=f"representatives@step-{step_id}",
        )
        target = store.extract(
            model,
            self.eval_dataset,
            self.target_settings,
            base_model_id=base_model_id,
            batch_size=self.batch_size,
            name=f"target@step-{step_id}",
            progress=False,
        )
        return {
            "pool": pool,
            "clusters": cref,
            "representatives": reps,
            "rep_features": rep_ref,
            "target": target,
            "cache_hit": all(r["status"] == "hit" for r in (pool, cref, rep_ref, target)),
        }

    def cluster_scores(self, feats: dict[str, Any], labels: np.ndarray, n_clusters: int) -> torch.Tensor:
        """[K] LESS score of each cluster vector (normalised mean of its representatives' normalised features)."""
        rep = normalize_rows(GradientDatastore.load(feats["rep_features"]).features)
        rep_labels = torch.from_numpy(labels[np.asarray(feats["representatives"], dtype=np.int64)])
        vec = torch.zeros(n_clusters, rep.shape[1])
        vec.index_add_(0, rep_labels, rep)
        target = normalize_rows(GradientDatastore.load(feats["target"]).features)
        cols = self.eval_dataset.column_names if hasattr(self.eval_dataset, "column_names") else []
        subtasks = list(self.eval_dataset["domain_id"]) if "domain_id" in cols else None
        return aggregate(normalize_rows(vec) @ target.T, subtasks, self.aggregation)

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        t = load_file(feats["clusters"]["path"])
        labels, centroids = t["labels"].numpy(), t["centroids"].numpy()
        scores = self.cluster_scores(feats, labels, len(centroids))
        order = torch.sort(-scores.double(), stable=True).indices.tolist()  # best first, ties to the lower id
        members = ranked_members(EmbeddingStore.load(feats["pool"]), labels, centroids)
        picked = fill_to(spread_budget(order, members, num_samples, self.max_cluster_share), num_samples)
        chosen = np.bincount(labels[np.asarray(picked)], minlength=len(centroids))
        self.last_metric = {
            "clusters": len(centroids),
            "clusters_used": int((chosen > 0).sum()),
            "largest_cluster_share": float(chosen.max() / max(len(picked), 1)),
            "cluster_scores": [float(s) for s in scores],
        }
        return broadcast_object(self.accelerator, picked)  # rank 0's choice everywhere
