"""`less`: online LESS on the current model and the live Adam moments.

`compute_features` stores Adam features of the pool and SGD features of `eval_dataset` (the target) in the
gradient datastore (one batched pass each, keyed by content, so a re-run reuses them); `select` scores every
pool sample by its cosine with the target examples, aggregated `mean` over all of them (DataFlex) or `max` over
subtasks of the per-subtask mean (LESS; subtasks are the eval sets, `domain_id`), and takes the top
`num_samples` (ties to the lower index). ε placement defaults to LESS's (inside the sqrt); DataFlex's is
`adam_eps_placement: outside`. Betas and ε come from the run's optimizer, not hard-coded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector
from dataflex.features import FeatureSettings, GradientDatastore, less_scores, top_k
from dataflex.features.matching import AGGREGATIONS

from .base_selector import Selector
from .embedding_common import SAVE_INTERVAL_WHY, notice_unused


@register_selector("less")
class LessSelector(Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        eval_dataset: Any = None,
        cache_dir: str | None = None,
        gradient_type: str = "adam",
        proj_dim: int = 8192,
        seed: int = 42,
        projector: str = "sjlt",
        adam_eps_placement: str = "inside",
        aggregation: str = "mean",
        batch_size: int = 16,
        save_interval: int | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        if eval_dataset is None or len(eval_dataset) == 0:
            raise ConfigError("selector 'less' needs an eval_dataset (the target task's examples); set eval_dataset")
        self.check_params(locals())
        self.eval_dataset = eval_dataset
        notice_unused("less", "save_interval", save_interval, SAVE_INTERVAL_WHY)  # accepted for DataFlex's YAMLs
        self.settings = FeatureSettings(
            gradient_type=gradient_type,
            projector=projector,
            proj_dim=int(proj_dim),
            seed=int(seed),
            adam_eps_placement=adam_eps_placement,
        )
        self.target_settings = self.settings.for_targets()
        self.aggregation, self.batch_size = aggregation, int(batch_size)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if params["aggregation"] not in AGGREGATIONS:
            raise ConfigError(f"selector 'less': aggregation must be one of {', '.join(AGGREGATIONS)}")

    def _store(self) -> GradientDatastore:
        return GradientDatastore(Path(self.cache_dir or "data/04_feature") / "datastore")

    def compute_features(
        self,
        model: torch.nn.Module,
        step_id: int,
        *,
        optimizer: Any = None,
        base_model_id: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        store = self._store()
        moments = optimizer if self.settings.gradient_type == "adam" else None
        if self.settings.gradient_type == "adam" and moments is None:
            raise ConfigError("selector 'less' with gradient_type adam needs the run's optimizer state")
        pool = store.extract(
            model,
            self.dataset,
            self.settings,
            base_model_id=base_model_id,
            optimizer_state=moments,
            batch_size=self.batch_size,
            name=f"pool@step-{step_id}",
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
        return {"pool": pool, "target": target, "cache_hit": pool["status"] == "hit" and target["status"] == "hit"}

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        train = GradientDatastore.load(feats["pool"]).features
        target = GradientDatastore.load(feats["target"]).features
        subtasks = list(self.eval_dataset["domain_id"]) if "domain_id" in self.eval_dataset.column_names else None
        scores = less_scores([train], [target], [1.0], subtasks, self.aggregation)
        picked = top_k(scores, max_samples=num_samples)
        if len(picked) < num_samples:  # more than the pool: repeat the ranking (top-k has no replacement)
            picked = (picked * (num_samples // len(picked) + 1))[:num_samples]
        self.last_metric = {"train_eval_similarity": [float(scores[i]) for i in picked]}
        return picked
