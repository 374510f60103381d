"""`cluster_less` (ClusterLESS): LESS scores for clusters of the pool.

`compute_features`: pool embeddings (default: mean hidden states of the current model at `layer`; any encoder of
`dataflex.features.embeddings`), a partition by `clustering_method` (`kmeans`: k-means++ with tolerance
`kmeans_tol`; `spherical`, `farthest_first`, `random_projection_lsh`, `random_partition`: see
`dataflex.features.clustering`; cached by the embeddings' content key, so a changed model re-clusters instead of
reusing stale ids), `representatives` rows per cluster picked by `representative_strategy` (`nearest` the
centroid by default; `random` is seeded by (`seed`, step)), and LESS features (Adam for the representatives, SGD
for the target) through the gradient datastore. `select`: cluster vector = normalised mean of its representatives'
normalised features, cluster score = its cosine with the target aggregated like `less`; clusters in score order
give at most ceil(`max_cluster_share` · budget) rows each per pass, most central first, so one huge cluster cannot
take the whole budget (DataFlex filled whole clusters, the last one in arbitrary order). `gradient_type` is LESS's
`adam` (default), `sgd` or `sign` (no optimizer state for the last two); `aggregation`, `subtask_column` (a raw-data
column splitting the target rows into LESS's subtasks) and `exclude_selected` (false, DataFlex's: its top-k repeats
the same clusters every update; true: no row twice in a flex epoch, the memory in `state_dict`) work as in `less`.

DataFlex's parameters: `cluster_size` (rows per cluster: K = ceil(N / cluster_size)), `num_clusters` (= our
`n_clusters`), `samples_per_cluster` (= `representatives`), `clustering_batch_size` (= `embedding_batch_size`),
`clustering_max_iter` (= `kmeans_max_iter`), `embedding_layer` (= `layer`), `embedding_dtype` (=
`embedding_model_dtype`), `assignment_chunk_size`, `lsh_num_bits`, and `embedding_model_name_or_path`: a local
causal LM with the training vocabulary that embeds the pool ONCE; the clustering is then frozen for the run (the
embeddings are keyed by that model's files, not by the training state). `save_interval` is accepted and ignored.
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
from dataflex.features import FeatureSettings, GradientDatastore
from dataflex.features.clustering import (
    DEFAULT_CHUNK,
    MAX_LSH_BITS,
    canonical_method,
    canonical_strategy,
    cluster,
    num_clusters_for,
    ranked_by_strategy,
    ranked_members,
    spread_budget,
)
from dataflex.features.embeddings import (
    MODEL_DTYPES,
    MODEL_ENCODER,
    EmbeddingSettings,
    EmbeddingStore,
    load_embedding_model,
)
from dataflex.features.matching import AGGREGATIONS, aggregate, normalize_rows
from dataflex.utils.io import atomic_write_bytes, sha256_json
from dataflex.utils.logging import logger

from .base_selector import Selector
from .embedding_common import (
    SAVE_INTERVAL_WHY,
    SUBTASK_COLUMN_WHY,
    EmbeddingMixin,
    SelectionMemory,
    alias,
    check_target_params,
    needs_target,
    notice_unused,
    positive_int,
    signature_default,
    target_subtasks,
)

CLUSTER_CODE_VERSION = "2"
# (ours, DataFlex's) names of one setting; DataFlex's default is None, ours lives in the signature.
ALIASES = (
    ("n_clusters", "num_clusters"),
    ("representatives", "samples_per_cluster"),
    ("embedding_batch_size", "clustering_batch_size"),
    ("kmeans_max_iter", "clustering_max_iter"),
    ("layer", "embedding_layer"),
    ("embedding_model_dtype", "embedding_dtype"),
)


@register_selector("cluster_less")
class ClusterLessSelector(EmbeddingMixin, SelectionMemory, Selector):
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
        cluster_size: int | None = None,
        representatives: int = 4,
        clustering_method: str = "kmeans",
        representative_strategy: str = "nearest",
        kmeans_tol: float = 1e-4,
        kmeans_max_iter: int = 300,
        assignment_chunk_size: int = DEFAULT_CHUNK,
        lsh_num_bits: int | None = None,
        max_cluster_share: float = 0.5,
        embedding_model_name_or_path: str | None = None,
        embedding_model_dtype: str = "auto",
        gradient_type: str = "adam",
        proj_dim: int = 8192,
        projector: str = "sjlt",
        adam_eps_placement: str = "inside",
        aggregation: str = "mean",
        batch_size: int = 16,
        tokenizer_path: str | None = None,
        num_clusters: int | None = None,
        samples_per_cluster: int | None = None,
        clustering_batch_size: int | None = None,
        clustering_max_iter: int | None = None,
        embedding_layer: int | None = None,
        embedding_dtype: str | None = None,
        save_interval: int | None = None,
        exclude_selected: bool = False,
        subtask_column: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.check_params(locals())
        p = self.resolved(locals())
        self.eval_dataset = needs_target("cluster_less", eval_dataset)
        self.exclude_selected, self.subtask_column = exclude_selected, subtask_column
        self.subtasks = target_subtasks("cluster_less", self.eval_dataset, subtask_column)
        if aggregation == "mean":
            notice_unused("cluster_less", "subtask_column", subtask_column, SUBTASK_COLUMN_WHY)
        self.embedding_model_path = embedding_model_name_or_path
        self.embedding_model_dtype = p["embedding_model_dtype"]
        self.embedding = EmbeddingSettings(
            encoder=encoder,
            layer=p["layer"],
            text=text,
            max_length=max_length,
            batch_size=p["embedding_batch_size"],
        )
        # An explicit count (num_clusters) wins over cluster_size, as in DataFlex.
        self.n_clusters = p["n_clusters"]
        self.cluster_size = cluster_size if num_clusters is None else None
        self.representatives, self.kmeans_max_iter = p["representatives"], p["kmeans_max_iter"]
        self.clustering_method = canonical_method(clustering_method)
        self.representative_strategy = canonical_strategy(representative_strategy)
        self.assignment_chunk_size, self.lsh_num_bits = assignment_chunk_size, lsh_num_bits
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
        self.batch_size = batch_size
        self.tokenizer_path = tokenizer_path
        self._frozen_pool: dict[str, Any] | None = None
        notice_unused("cluster_less", "save_interval", save_interval, SAVE_INTERVAL_WHY)

    @classmethod
    def resolved(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Our settings with DataFlex's aliases folded in."""
        return {ours: alias(cls, "cluster_less", params, ours, theirs) for ours, theirs in ALIASES}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        name = "cluster_less"
        for ours, theirs in ALIASES:  # each name checked as the user wrote it
            if params.get(theirs) is not None and ours not in ("layer", "embedding_model_dtype"):
                positive_int(name, theirs, params[theirs])
        p = cls.resolved(params)
        for key in ("n_clusters", "representatives", "kmeans_max_iter", "embedding_batch_size"):
            positive_int(name, key, p[key])
        positive_int(name, "assignment_chunk_size", params["assignment_chunk_size"])
        positive_int(name, "batch_size", params["batch_size"])
        if params.get("cluster_size") is not None:
            positive_int(name, "cluster_size", params["cluster_size"])
            if params.get("num_clusters") is None and p["n_clusters"] != signature_default(cls, "n_clusters"):
                raise ConfigError(
                    f"selector '{name}': set n_clusters (the number of clusters) or cluster_size (rows per "
                    "cluster, DataFlex's), not both"
                )
        bits = params.get("lsh_num_bits")
        if bits is not None and (positive_int(name, "lsh_num_bits", bits) > MAX_LSH_BITS):
            raise ConfigError(f"selector '{name}': lsh_num_bits must be at most {MAX_LSH_BITS}, got {bits!r}")
        if isinstance(p["layer"], bool) or not isinstance(p["layer"], int):
            raise ConfigError(f"selector '{name}': layer must be an integer (-1 = last), got {p['layer']!r}")
        canonical_method(params["clustering_method"])
        canonical_strategy(params["representative_strategy"])
        tol, share = params["kmeans_tol"], params["max_cluster_share"]
        if isinstance(tol, bool) or not isinstance(tol, int | float) or tol < 0:
            raise ConfigError(f"selector '{name}': kmeans_tol must be a number >= 0, got {tol!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not (0 < share <= 1):
            raise ConfigError(f"selector '{name}': max_cluster_share must be in (0, 1], got {share!r}")
        if params["aggregation"] not in AGGREGATIONS:
            raise ConfigError(f"selector '{name}': aggregation must be one of {', '.join(AGGREGATIONS)}")
        check_target_params(name, params)
        if p["embedding_model_dtype"] not in MODEL_DTYPES:
            raise ConfigError(
                f"selector '{name}': embedding_model_dtype must be one of {', '.join(MODEL_DTYPES)}, "
                f"got {p['embedding_model_dtype']!r}"
            )
        path = params.get("embedding_model_name_or_path")
        if path is not None:
            if not isinstance(path, str) or not Path(path).expanduser().is_dir():
                raise ConfigError(
                    f"selector '{name}': embedding_model_name_or_path {path!r} is not a local model folder "
                    "(embeddings never download)"
                )
            if params.get("encoder", MODEL_ENCODER) != MODEL_ENCODER:
                raise ConfigError(
                    f"selector '{name}': embedding_model_name_or_path replaces the training model as the "
                    f"'{MODEL_ENCODER}' encoder; remove encoder ({params['encoder']!r}) or the embedding model"
                )

    @property
    def needs_model(self) -> bool:
        return True  # LESS features of the representatives

    def pool_embeddings(
        self, model: torch.nn.Module, step_id: int, base_model_id: str | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The pool's embeddings: once per run with the standalone embedding model (frozen: keyed by its files,
        loaded only on a cache miss), else with `encoder` at this step."""
        store = EmbeddingStore(self._root() / "embeddings")
        if self.embedding_model_path is None:
            tok, tok_id = self._tokenizer(model, kwargs)
            return store.embed(
                self.dataset,
                self.embedding,
                model=model,
                tokenizer=tok,
                base_model_id=base_model_id,
                tokenizer_id=tok_id,
                name=f"pool@step-{step_id}",
                progress=True,
            )
        if self._frozen_pool is not None:
            return {**self._frozen_pool, "status": "hit"}
        from dataflex.models import model_fingerprint

        path, dtype = str(self.embedding_model_path), self.embedding_model_dtype
        vocab = model.get_input_embeddings().num_embeddings if model is not None else None

        def load() -> torch.nn.Module:
            emb_model = load_embedding_model(path, dtype)
            if vocab is not None and emb_model.get_input_embeddings().num_embeddings != vocab:
                raise ConfigError(
                    f"selector 'cluster_less': embedding model {path!r} has a vocabulary of "
                    f"{emb_model.get_input_embeddings().num_embeddings} but the training model has {vocab}: it "
                    "reads the pool's token ids, so it needs the training model's tokenizer"
                )
            logger.info("cluster_less: embedding the pool once with %s (dtype %s)", path, dtype)
            return emb_model

        self._frozen_pool = store.embed(
            self.dataset,
            self.embedding,
            model_id=sha256_json({"model": model_fingerprint(path), "dtype": dtype}),
            model_loader=load,
            name="pool@frozen",
            progress=True,
        )
        return self._frozen_pool

    def clusters(self, pool_ref: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """(ref, labels, centroids), cached under `<cache_dir>/clusters` by the embeddings' key and the settings."""
        k = num_clusters_for(
            len(self.dataset),
            n_clusters=self.n_clusters if self.cluster_size is None else None,
            cluster_size=self.cluster_size,
        )
        key = sha256_json(
            {
                "embeddings": pool_ref["key"],
                "method": self.clustering_method,
                "k": k,
                "seed": self.seed,
                "tol": self.kmeans_tol,
                "max_iter": self.kmeans_max_iter,
                "lsh_bits": self.lsh_num_bits,
                "version": CLUSTER_CODE_VERSION,
            }
        )
        path = self._root() / "clusters" / f"{key[:32]}.safetensors"
        if cached_for_all(path):
            t = load_file(str(path))
            return {"path": str(path), "key": key, "status": "hit"}, t["labels"].numpy(), t["centroids"].numpy()
        labels, centroids = cluster(
            EmbeddingStore.load(pool_ref),
            self.clustering_method,
            k,
            seed=self.seed,
            max_iter=self.kmeans_max_iter,
            tol=self.kmeans_tol,
            chunk=self.assignment_chunk_size,
            lsh_bits=self.lsh_num_bits,
        )
        tensors = {
            "labels": torch.from_numpy(labels).contiguous(),
            "centroids": torch.from_numpy(centroids).contiguous(),
        }
        with main_process_writes() as writer:
            if writer:
                atomic_write_bytes(path, save(tensors, metadata={"key": key}))
        sizes = np.bincount(labels, minlength=len(centroids))
        logger.info(
            "cluster_less: %d clusters by %s (sizes %d..%d)",
            len(centroids),
            self.clustering_method,
            sizes.min(),
            sizes.max(),
        )
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
                "(or set gradient_type: sgd or sign)"
            )
        pool = self.pool_embeddings(model, step_id, base_model_id, kwargs)
        cref, labels, centroids = self.clusters(pool)
        ranked = ranked_by_strategy(
            EmbeddingStore.load(pool),
            labels,
            centroids,
            self.representative_strategy,
            seed=[int(self.seed), int(step_id)],
        )
        reps = [i for m in ranked for i in m[: self.representatives]]
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
        return aggregate(normalize_rows(vec) @ target.T, self.subtasks, self.aggregation)

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        t = load_file(feats["clusters"]["path"])
        labels, centroids = t["labels"].numpy(), t["centroids"].numpy()
        scores = self.cluster_scores(feats, labels, len(centroids))
        order = torch.sort(-scores.double(), stable=True).indices.tolist()  # best first, ties to the lower id
        members = ranked_members(EmbeddingStore.load(feats["pool"]), labels, centroids)
        excluded = self.excluded()
        if excluded:  # rows picked earlier in this flex epoch leave their clusters
            members = [[i for i in m if i not in excluded] for m in members]
        picked = self.take(
            "cluster_less", spread_budget(order, members, num_samples, self.max_cluster_share), num_samples
        )
        chosen = np.bincount(labels[np.asarray(picked)], minlength=len(centroids))
        self.last_metric = {
            "clusters": len(centroids),
            "clusters_used": int((chosen > 0).sum()),
            "largest_cluster_share": float(chosen.max() / max(len(picked), 1)),
            "cluster_scores": [float(s) for s in scores],
            "clustering_method": self.clustering_method,
            "representative_strategy": self.representative_strategy,
        }
        return broadcast_object(self.accelerator, picked)  # rank 0's choice everywhere
