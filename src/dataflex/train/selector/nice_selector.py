"""`nice` (NICE): LESS matching against policy-gradient target features.

Offline, once (content-cached table): `mc_samples` rollouts per target prompt from the fixed local policy
`policy_model_path` (same vocabulary as the training model, checked) and their rewards (`reward`: `token_f1`,
`exact_match` or a local sequence-classification model folder). Online, per selection: the pool's LESS features
(Adam transform really applied with `gradient_type: adam`) and the rollouts' SGD features of the current model,
both through the gradient datastore; the target feature of a prompt is the reward-weighted sum of its rollouts'
likelihood gradients, G(x) = (1/mc) Σ_m (r_m − b) ∇ Σ_t NLL(y_m) (`baseline: mean` sets b to the prompt's mean
reward; `nll: mean` uses the token mean instead of the sum). Scores and top-k as `less`, with its `gradient_type`
(`adam`, `sgd` or `sign`), `aggregation`, `subtask_column` and `exclude_selected` (false: DataFlex's, whose top-k
repeats the same rows every update; true: no row twice in a flex epoch, the memory in `state_dict`).

DataFlex's parameters: `reward_model_path` (a local sequence-classification judge = `reward: <folder>`),
`generation_temperature` (= `temperature`), `prompt_template`, `reward_prompt_with_ref` /
`reward_prompt_without_ref` (the judge's input), `max_prompt_length` (see `dataflex.features.rollouts`),
`reward_model_backend` (`local` only: `local_vllm` and `api` need vLLM / the network and are refused) with
`reward_backend_params` (its `local` section: `hf_model_name_or_path`, `batch_size`; other backends' sections are
ignored with a notice), and `save_interval` (accepted, ignored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import torch

from dataflex.core.errors import ConfigError
from dataflex.core.registry import register_selector
from dataflex.distributed.collectives import broadcast_object
from dataflex.features import FeatureSettings, GradientDatastore, less_scores, top_k
from dataflex.features.matching import AGGREGATIONS
from dataflex.features.rollouts import (
    BASELINES,
    DEFAULT_REWARD_PROMPT_WITH_REF,
    DEFAULT_REWARD_PROMPT_WITHOUT_REF,
    METRIC_REWARDS,
    NLL_REDUCTIONS,
    PROMPT_FIELDS,
    REWARD_FIELDS,
    check_reward,
    rollout_dataset,
    rollout_table,
    rollout_weights,
    template_problem,
)
from dataflex.utils.logging import logger

from .base_selector import Selector
from .embedding_common import (
    SAVE_INTERVAL_WHY,
    SUBTASK_COLUMN_WHY,
    SelectionMemory,
    alias,
    check_target_params,
    needs_target,
    notice_unused,
    positive_int,
    resolve_tokenizer,
    signature_default,
    target_subtasks,
)

REWARD_BACKENDS = ("local", "local_vllm", "api")
LOCAL_BACKEND_KEYS = ("hf_model_name_or_path", "batch_size")


def nice_target_features(rollout_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[n_targets, k]: each prompt's reward-weighted sum of its rollouts' features (W @ F)."""
    return weights.to(rollout_features.dtype) @ rollout_features.float()


@register_selector("nice")
class NiceSelector(SelectionMemory, Selector):
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
        max_prompt_length: int = 4096,
        prompt_template: str | None = None,
        reward_prompt_with_ref: str | None = None,
        reward_prompt_without_ref: str | None = None,
        reward_model_path: str | None = None,
        generation_temperature: float | None = None,
        reward_model_backend: str | None = None,
        reward_backend_params: dict[str, Any] | None = None,
        save_interval: int | None = None,
        exclude_selected: bool = False,
        subtask_column: str | None = None,
    ) -> None:
        super().__init__(dataset, accelerator, data_collator, cache_dir, seed=seed)
        self.eval_dataset = needs_target("nice", eval_dataset)
        self.check_params(locals())
        p = self.resolved(locals())
        self.exclude_selected, self.subtask_column = exclude_selected, subtask_column
        self.subtasks = target_subtasks("nice", self.eval_dataset, subtask_column)
        if aggregation == "mean":
            notice_unused("nice", "subtask_column", subtask_column, SUBTASK_COLUMN_WHY)
        self.policy_model_path, self.reward = str(policy_model_path), str(p["reward"])
        self.mc_samples = positive_int("nice", "mc_samples", mc_samples)
        self.max_new_tokens = positive_int("nice", "max_new_tokens", max_new_tokens)
        self.temperature, self.baseline, self.nll, self.aggregation = (
            float(p["temperature"]),
            baseline,
            nll,
            aggregation,
        )
        self.max_prompt_length, self.prompt_template = max_prompt_length, prompt_template
        self.reward_batch_size = p["reward_batch_size"]
        self.reward_prompts: tuple[str, str] | None = None
        if self.reward not in METRIC_REWARDS:
            self.reward_prompts = (
                reward_prompt_with_ref or DEFAULT_REWARD_PROMPT_WITH_REF,
                reward_prompt_without_ref or DEFAULT_REWARD_PROMPT_WITHOUT_REF,
            )
        else:
            why = f"the reward is the metric {self.reward!r}; only a reward model reads a prompt"
            notice_unused("nice", "reward_prompt_with_ref", reward_prompt_with_ref, why)
            notice_unused("nice", "reward_prompt_without_ref", reward_prompt_without_ref, why)
        notice_unused("nice", "save_interval", save_interval, SAVE_INTERVAL_WHY)
        for section in p["ignored_sections"]:
            logger.info("selector 'nice': reward_backend_params.%s is ignored (the reward backend is local)", section)
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
        check_reward(self.reward)  # a bad reward is a config error now, not after training

    needs_model = True

    @classmethod
    def resolved(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Our settings with DataFlex's names folded in: the reward (a metric, `reward_model_path` or the local
        backend's `hf_model_name_or_path`), the temperature, the reward batch size and the ignored sections."""
        backend = str(params.get("reward_model_backend") or "local").lower()
        if backend not in REWARD_BACKENDS:
            raise ConfigError(
                f"selector 'nice': reward_model_backend must be local (or DataFlex's local_vllm / api, which are not "
                f"supported here), got {params.get('reward_model_backend')!r}"
            )
        if backend != "local":
            raise ConfigError(
                f"selector 'nice': reward_model_backend {backend} is not supported: vLLM and API reward backends "
                "need vLLM or network access; use reward_model_backend: local with reward_model_path (a local "
                "sequence-classification model) or reward: token_f1"
            )
        raw = params.get("reward_backend_params") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"selector 'nice': reward_backend_params must be a mapping, got {raw!r}")
        sectioned = any(k in REWARD_BACKENDS for k in raw)
        section = (raw.get("local") or {}) if sectioned else raw  # DataFlex nests params per backend
        if not isinstance(section, dict):
            raise ConfigError(f"selector 'nice': reward_backend_params.local must be a mapping, got {section!r}")
        unknown = sorted(set(section) - set(LOCAL_BACKEND_KEYS))
        if unknown:
            raise ConfigError(
                f"selector 'nice': reward_backend_params for the local backend does not take {', '.join(unknown)}; "
                f"accepted: {', '.join(LOCAL_BACKEND_KEYS)}"
            )
        paths = {
            k: v
            for k, v in (
                ("reward_model_path", params.get("reward_model_path")),
                ("reward_backend_params.hf_model_name_or_path", section.get("hf_model_name_or_path")),
            )
            if v is not None
        }
        if len(set(map(str, paths.values()))) > 1:
            raise ConfigError(f"selector 'nice': {' and '.join(paths)} name different reward models; set one")
        reward = params.get("reward", signature_default(cls, "reward"))
        if paths:
            path = str(next(iter(paths.values())))
            if reward not in (signature_default(cls, "reward"), path):
                raise ConfigError(
                    f"selector 'nice': reward ({reward!r}) and {next(iter(paths))} ({path!r}) are one setting; "
                    "set one of them"
                )
            reward = path
        batch = section.get("batch_size")
        return {
            "reward": reward,
            "reward_from": next(iter(paths), "reward"),
            "temperature": alias(cls, "nice", params, "temperature", "generation_temperature"),
            "reward_batch_size": batch,
            "ignored_sections": sorted(k for k in raw if k != "local") if sectioned else [],
        }

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        p = cls.resolved(params)
        if p["reward_from"] != "reward" and not Path(str(p["reward"])).expanduser().is_dir():
            raise ConfigError(
                f"selector 'nice': {p['reward_from']} {p['reward']!r} is not a local sequence-classification model "
                "folder (rewards never download)"
            )
        if p["reward_batch_size"] is not None:
            positive_int("nice", "reward_backend_params.batch_size", p["reward_batch_size"])
        positive_int("nice", "max_prompt_length", params["max_prompt_length"])
        for key, fields in (
            ("prompt_template", PROMPT_FIELDS),
            ("reward_prompt_with_ref", REWARD_FIELDS),
            ("reward_prompt_without_ref", REWARD_FIELDS),
        ):
            if params.get(key) is not None and (why := template_problem(params[key], fields)):
                raise ConfigError(f"selector 'nice': {key} {why}")
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
        temperature = p["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature <= 0:
            raise ConfigError(f"selector 'nice': temperature must be > 0, got {temperature!r}")
        positive_int("nice", "mc_samples", params["mc_samples"])
        positive_int("nice", "max_new_tokens", params["max_new_tokens"])
        check_target_params("nice", params)

    def _root(self) -> Path:
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
            prompt_template=self.prompt_template,
            max_prompt_length=self.max_prompt_length,
            reward_prompts=self.reward_prompts,
            **({"reward_batch_size": self.reward_batch_size} if self.reward_batch_size else {}),
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
                "selector 'nice' with gradient_type adam needs the run's optimizer state "
                "(or set gradient_type: sgd or sign)"
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
        scores = less_scores([train], [target], [1.0], self.subtasks, self.aggregation)
        # The best num_samples rows outside the memory are among the best num_samples + |memory|.
        ranking = top_k(scores, max_samples=min(len(scores), num_samples + len(self.excluded())))
        picked = self.take("nice", ranking, num_samples)
        self.last_metric = {
            "train_eval_similarity": [float(scores[i]) for i in picked],
            "mean_reward": feats.get("mean_reward"),
        }
        return broadcast_object(self.accelerator, picked)  # rank 0's choice everywhere
