"""`nice` (NICE): LESS matching against policy-gradient target features.

Offline, once (content-cached table): `mc_samples` rollouts per target prompt from the fixed local policy
`policy_model_path` (same vocabulary as the training model, checked) and their rewards (`reward`: `token_f1`,
`exact_match` or a local sequence-classification model folder). Online, per selection: the pool's LESS features
(Adam transform really applied with `gradient_type: adam`) and the rollouts' SGD features of the current model,
both through the gradient datastore; the target feature of a prompt is the reward-weighted sum of its rollouts'
likelihood gradients, G(x) = (1/mc) Σ_m (r_m − b) ∇ Σ_t NLL(y_m) (`baseline: mean` sets b to the prompt's mean
reward; `nll: mean` uses the token mean instead of the sum). Scores and top-k as `less`.
"""

from __future__ import annotations

import json
from typing import Any

import datasets
import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector
from dataflex.distributed.collectives import broadcast_object
from dataflex.features import FeatureSettings, GradientDatastore, less_scores, top_k
from dataflex.features.matching import AGGREGATIONS
from dataflex.features.rollouts import BASELINES, NLL_REDUCTIONS, rollout_dataset, rollout_table, rollout_weights

from .base_selector import Selector
from .embedding_common import fill_to, needs_target, positive_int, resolve_tokenizer


def nice_target_features(rollout_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[n_targets, k]: each prompt's reward-weighted sum of its rollouts' features (W @ F)."""
    return weights.to(rollout_features.dtype) @ rollout_features.float()


@register_selector("nice")
class NiceSelector(Selector):
    def __init__(
        self,
        dataset: Any,
        accelerator: Any,
        data_collator: Any,
        eval_dataset: Any = None,
        cache_dir: str | None = None,
        seed: int = 42,
        policy_model_path: str | None = None,
        reward: str = "token_f1",
        mc_samples: int = 4,
        max_new_tokens: int = 32,
        temperature: float = 0.7,
        baseline: str = "none",
        nll: str = "sum",
        gradient_type: str = "adam",
        proj_dim: int = 8192,
        projector: str = "sjlt",
        adam_eps_placement: str = "inside",
        aggregation: str = "mean",
        batch_size: int = 16,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.eval_dataset = needs_target("nice", eval_dataset)
        self.check_params(locals())
        self.policy_model_path, self.reward = str(policy_model_path), str(reward)
        self.mc_samples = positive_int("nice", "mc_samples", mc_samples)
        self.max_new_tokens = positive_int("nice", "max_new_tokens", max_new_tokens)
        self.temperature, self.baseline, self.nll, self.aggregation = float(temperature), baseline, nll, aggregation
        self.settings = FeatureSettings(
            gradient_type=gradient_type,
            projector=projector,
            proj_dim=int(proj_dim),
            seed=int(seed),
            adam_eps_placement=adam_eps_placement,
        )
        self.target_settings = self.settings.for_targets()
        self.batch_size = positive_int("nice", "batch_size", batch_size)
        self.tokenizer_path = tokenizer_path
        from dataflex.features.rollouts import reward_function

        reward_function(self.reward)  # a bad reward is a config error now, not after training

    needs_model = True

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if not params["policy_model_path"]:
            raise ConfigError(
                "selector 'nice' needs policy_model_path: a local causal LM with the training model's "
                "tokenizer that generates the rollouts (e.g. the base model)"
            )
        if (
            params["baseline"] not in BASELINES
            or params["nll"] not in NLL_REDUCTIONS
            or params["aggregation"] not in AGGREGATIONS
        ):
            raise ConfigError(
                f"selector 'nice': baseline must be one of {', '.join(BASELINES)}, nll one of "
                f"{', '.join(NLL_REDUCTIONS)}, aggregation one of {', '.join(AGGREGATIONS)}"
            )
        temperature = params["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ConfigError(f"selector 'nice': temperature must be > 0, got {temperature!r}")
        positive_int("nice", "mc_samples", params["mc_samples"])
        positive_int("nice", "max_new_tokens", params["max_new_tokens"])

    def _root(self) -> Any:
        from pathlib import Path

        return Path(self.cache_dir or "data/04_feature")

    def rollouts(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        tok, _ = resolve_tokenizer(self.tokenizer_path, model, kwargs)
        return rollout_table(
            self.eval_dataset,
            self.policy_model_path,
            tok,
            self.reward,
            self._root() / "rollouts",
            mc_samples=self.mc_samples,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            vocab_size=model.get_input_embeddings().num_embeddings,
            progress=True,
        )

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
            raise ConfigError("selector 'nice' needs the training model")
        moments = optimizer if optimizer is not None else optimizer_state
        if self.settings.gradient_type == "adam" and moments is None:
            raise ConfigError(
                "selector 'nice' with gradient_type adam needs the run's optimizer state (or set gradient_type: sgd)"
            )
        table = self.rollouts(model, kwargs)
        keep, _ = rollout_weights(
            table["rows"], len(self.eval_dataset), self.mc_samples, baseline=self.baseline, nll=self.nll
        )
        rollout_ds = datasets.Dataset.from_dict(rollout_dataset(table["rows"], keep))
        store = GradientDatastore(self._root() / "datastore")
        pool = store.extract(
            model,
            self.dataset,
            self.settings,
            base_model_id=base_model_id,
            optimizer_state=moments if self.settings.gradient_type == "adam" else None,
            batch_size=self.batch_size,
            name=f"pool@step-{step_id}",
        )
        rolls = store.extract(
            model,
            rollout_ds,
            self.target_settings,
            base_model_id=base_model_id,
            batch_size=self.batch_size,
            name=f"rollouts@step-{step_id}",
            progress=False,
        )
        rewards = [r["reward"] for r in table["rows"]]
        return {
            "pool": pool,
            "rollouts": {"path": table["path"], "status": table["status"]},
            "rollout_features": rolls,
            "mean_reward": sum(rewards) / max(len(rewards), 1),
            "cache_hit": pool["status"] == rolls["status"] == table["status"] == "hit",
        }

    def target_features(self, feats: dict[str, Any]) -> torch.Tensor:
        rows = json.loads(open(feats["rollouts"]["path"]).read())["rows"]
        _, weights = rollout_weights(
            rows, len(self.eval_dataset), self.mc_samples, baseline=self.baseline, nll=self.nll
        )
        return nice_target_features(GradientDatastore.load(feats["rollout_features"]).features, weights)

    def select(self, model: torch.nn.Module, step_id: int, num_samples: int, **kwargs: Any) -> list[int]:
        feats = kwargs.get("features") or self.compute_features(model, step_id, **kwargs)
        train = GradientDatastore.load(feats["pool"]).features
        target = self.target_features(feats)
        cols = self.eval_dataset.column_names if hasattr(self.eval_dataset, "column_names") else []
        subtasks = list(self.eval_dataset["domain_id"]) if "domain_id" in cols else None
        scores = less_scores([train], [target], [1.0], subtasks, self.aggregation)
        picked = fill_to(top_k(scores, max_samples=num_samples), num_samples)
        self.last_metric = {
            "train_eval_similarity": [float(scores[i]) for i in picked],
            "mean_reward": feats.get("mean_reward"),
        }
        return broadcast_object(self.accelerator, picked)  # rank 0's choice everywhere
