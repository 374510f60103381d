"""`less`: online LESS on the current model and the live Adam moments.

`compute_features` stores Adam features of the pool (or `gradient_type: sgd` / `sign`: raw gradients or their
elementwise sign, LESS's other two types; no optimizer state) and SGD features of `eval_dataset` (the target) in
the gradient datastore (one batched pass each, keyed by content, so a re-run reuses them); `select` scores every
pool sample by its cosine with the target examples, aggregated `mean` over all of them (DataFlex) or `max` over
subtasks of the per-subtask mean (LESS; the subtasks are the eval sets, `domain_id`, each split further by the
values of the raw-data column `subtask_column` when set, e.g. `subject` for MMLU's 57 subjects in one dev file),
and takes the top `num_samples` (ties to the lower index). `exclude_selected: true` never picks a row an earlier
selection of the same flex epoch picked (the memory is in `state_dict`, so resume is exact); the default, false,
is DataFlex's (its top-k repeats the same rows every update). ε placement defaults to LESS's (inside the sqrt);
DataFlex's is `adam_eps_placement: outside`. Betas and ε come from the run's optimizer, not hard-coded.
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
from .embedding_common import (
    SAVE_INTERVAL_WHY,
    SUBTASK_COLUMN_WHY,
    SelectionMemory,
    check_target_params,
    notice_unused,
    target_subtasks,
)


@register_selector("less")
class LessSelector(SelectionMemory, Selector):
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
        exclude_selected: bool = False,
        subtask_column: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        if eval_dataset is None or len(eval_dataset) == 0:
            raise ConfigError("selector 'less' needs an eval_dataset (the target task's examples); set eval_dataset")
        self.check_params(locals())
        self.eval_dataset = eval_dataset
        notice_unused("less", "save_interval", save_interval, SAVE_INTERVAL_WHY)  # accepted for DataFlex's YAMLs
        self.exclude_selected, self.subtask_column = exclude_selected, subtask_column
        self.subtasks = target_subtasks("less", eval_dataset, subtask_column)
        if aggregation == "mean":
            notice_unused("less", "subtask_column", subtask_column, SUBTASK_COLUMN_WHY)
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
        check_target_params("less", params)

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
        scores = less_scores([train], [target], [1.0], self.subtasks, self.aggregation)
        # The best num_samples rows outside the memory are among the best num_samples + |memory|.
        ranking = top_k(scores, max_samples=min(len(scores), num_samples + len(self.excluded())))
        picked = self.take("less", ranking, num_samples)  # more than the pool: the ranking repeats
        self.last_metric = {"train_eval_similarity": [float(scores[i]) for i in picked]}
        return picked
