"""Dynamic mixing (`train_type: dynamic_mix`) as segments of one run.

The run is cut at the mixer's update points: round 0 trains `warmup_step` steps at the initial proportions;
round r >= 1 asks the mixer for proportions (`compute_mixture`) and trains the next `update_step` steps
(`train_segment`). Each segment resumes the previous segment's TrainState, so the chain equals one run
(one LR schedule, one sampler state). With `static_mix: true` there is one segment at the initial
proportions and no mixer. Kedro unrolls the rounds as `dynamic_mix.round_<k>` nodes; this module works
without Kedro.

Schedule (DataFlex's, spec dataflex-mix-weight.md 1.1 and 2.4): with update_times >= 1 the run has
warmup_step + update_step * update_times steps; with update_times <= 0 it has `train_step` (or the
epoch-derived count) and updates every update_step steps after warmup.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflex.core.components_cfg import component_spec, load_components_cfg
from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY, import_user_modules
from dataflex.data import DataCollatorForCausalLM, domain_names
from dataflex.distributed.launch import distributed, launch
from dataflex.models import load_tokenizer, model_fingerprint, save_trained
from dataflex.train.dataset.mixed_proportion_manager import MixedProportionManager, check_proportions
from dataflex.train.runner import build_model
from dataflex.train.trainer import Trainer, TrainingArguments, make_accelerator
from dataflex.train.trainer.plan import MixturePlan
from dataflex.utils.io import atomic_write_text


@dataclass(frozen=True)
class MixSchedule:
    max_steps: int
    boundaries: list[int]  # end step of each round; round 0 ends at warmup_step (or max_steps when static)

    @property
    def num_rounds(self) -> int:
        return len(self.boundaries)

    def start(self, round_k: int) -> int:
        return 0 if round_k == 0 else self.boundaries[round_k - 1]


def mix_schedule(flex: Mapping[str, Any], train: Mapping[str, Any], pool_size: int) -> MixSchedule:
    processes = int(train.get("num_processes") or 1)
    g = train["per_device_train_batch_size"] * train["gradient_accumulation_steps"] * processes
    if train.get("max_steps", -1) > 0:
        default_steps = train["max_steps"]
    else:
        default_steps = max(1, math.floor(pool_size / g) * train["num_train_epochs"])
    if flex.get("static_mix") or flex.get("single_segment"):
        # one segment: static mixing, or a mixer that acts inside the loop only (the DoReMi proxy)
        total = flex["train_step"] if flex.get("train_step", 0) > 0 else int(default_steps)
        return MixSchedule(total, [total])
    w, u, t = flex["warmup_step"], flex["update_step"], flex["update_times"]
    if w < 1 or u < 1:
        raise ConfigError(f"dynamic_mix needs warmup_step >= 1 and update_step >= 1, got {w} and {u}")
    if t >= 1:
        total = w + u * t
    else:
        total = flex["train_step"] if flex.get("train_step", 0) > 0 else int(default_steps)
    if total <= w:
        raise ConfigError(f"the run has {total} steps, not more than warmup_step={w}: the mixer would never act")
    boundaries = [w]
    while boundaries[-1] < total:
        boundaries.append(min(boundaries[-1] + u, total))
    return MixSchedule(total, boundaries)


def build_manager(train_pool: Any, flex: Mapping[str, Any], seed: int) -> tuple[MixedProportionManager, list[int]]:
    names = domain_names(train_pool)
    ids = train_pool["domain_id"]
    sizes = [0] * len(names)
    for d in ids:
        sizes[d] += 1
    offsets = [sum(sizes[:k]) for k in range(len(names))]
    init = flex.get("init_mixture_proportions")
    if init is not None:
        check_proportions(init, len(names), "init_mixture_proportions")
    manager = MixedProportionManager(
        names, sizes, rule=flex.get("mixture_sample_rule") or "mixture", init_proportions=init, seed=seed
    )
    return manager, offsets


def build_mixer(flex: Mapping[str, Any], manager: MixedProportionManager, runtime: Mapping[str, Any]) -> Any:
    name = flex.get("component_name")
    if not name:
        raise ConfigError("dynamic_mix needs component_name (a registered mixer), or static_mix: true")
    import_user_modules(flex.get("user_modules"))
    registered, params = component_spec(
        load_components_cfg(flex.get("components_cfg_file"), flex.get("components")), "mixer", name
    )
    return REGISTRY.build("mixer", registered, runtime={**runtime, "mixture_manager": manager}, cfg=params)


def check_mix_config(flex: Mapping[str, Any], num_domains: int | None = None) -> None:
    """Mix-specific config errors, before any work."""
    from dataflex.train.dataset.mixed_proportion_manager import RULES

    rule = flex.get("mixture_sample_rule") or "mixture"
    if rule not in RULES:
        raise ConfigError(f"mixture_sample_rule '{rule}' is not valid; use one of {', '.join(RULES)}")
    if flex.get("static_mix"):
        return
    if (flex.get("mixture_sample_rule") or "mixture") != "mixture":
        raise ConfigError(
            f"mixture_sample_rule '{flex['mixture_sample_rule']}' fixes the proportions, so a dynamic "
            "mixer could not change them; use 'mixture' or set static_mix: true"
        )
    if num_domains is not None and num_domains < 2:
        raise ConfigError("dynamic_mix with a mixer needs at least two domains (datasets in `dataset`)")


class _Segment:
    """A Trainer for one segment of the mixed run, resumed from the previous segment's checkpoint."""

    def __init__(
        self,
        train_pool: Any,
        model_params: Mapping[str, Any],
        train_params: Mapping[str, Any],
        flex: Mapping[str, Any],
        resume: str | None,
        metrics_sink: Callable[[dict[str, float], int], None] | None,
    ) -> None:
        self.args = TrainingArguments.from_dict({**train_params, "resume_from_checkpoint": resume})
        self.schedule = mix_schedule(flex, train_params, len(train_pool))
        self.tokenizer = load_tokenizer(model_params["model_name_or_path"])
        self.collator = DataCollatorForCausalLM(self.tokenizer)
        self.manager, offsets = build_manager(train_pool, flex, self.args.seed)
        plan = MixturePlan(
            self.manager,
            offsets,
            self.args.per_device_train_batch_size,
            self.args.gradient_accumulation_steps * self.args.num_processes,
            num_steps=self.schedule.max_steps,
        )
        accelerator = make_accelerator(self.args)
        self.mixer = None
        if not flex.get("static_mix"):
            runtime = {"dataset": train_pool, "accelerator": accelerator, "data_collator": self.collator}
            self.mixer = build_mixer(flex, self.manager, runtime)
        components = {"mixer": self.mixer} if self.mixer is not None else {}
        self.trainer = Trainer(
            build_model(model_params, seed=self.args.seed),
            train_pool,
            self.args,
            data_collator=self.collator,
            plan=plan,
            components=components,
            # Mixers that observe training (ODM, DoReMi) see every step; DoReMi also trains the proxy on its loss.
            observers=[self.mixer] if hasattr(self.mixer, "on_step_end") else [],
            loss_fn=getattr(self.mixer, "loss_fn", None),
            metrics_sink=metrics_sink,
            domain_names=domain_names(train_pool),
            accelerator=accelerator,
            model_fingerprint=model_fingerprint(model_params["model_name_or_path"]),
        )
        self.trainer.restore()


def train_segment(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    round_k: int,
    previous: Mapping[str, Any] | None = None,
    mixture: Mapping[str, Any] | None = None,
    metrics_sink: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, Any]:
    """Train round `round_k` (from `previous` round's state, at `mixture`'s proportions); returns this round's state.
    With num_processes > 1 the round trains on that many accelerate workers."""
    if distributed(train_params):
        return launch(
            "dataflex.train.mix:train_segment",
            train_params,
            datasets={"train_pool": train_pool},
            kwargs={
                "model_params": dict(model_params),
                "train_params": dict(train_params),
                "flex": dict(flex),
                "round_k": round_k,
                "previous": previous and dict(previous),
                "mixture": mixture and dict(mixture),
            },
            metrics_sink=metrics_sink,
        )
    seg = _Segment(train_pool, model_params, train_params, flex, previous and previous["checkpoint"], metrics_sink)
    start, end = seg.schedule.start(round_k), seg.schedule.boundaries[round_k]
    if seg.trainer.global_step != start:
        raise ConfigError(f"round {round_k} starts at step {start} but its input state is at {seg.trainer.global_step}")
    if mixture is not None:
        if seg.mixer is not None:
            seg.mixer.load_state_dict(mixture.get("mixer_state") or {})
        seg.manager.set_proportions(mixture["proportions"])
    result = seg.trainer.train(until_step=end)
    checkpoint = seg.trainer.save_checkpoint()
    return {
        "round": round_k,
        "step": result.global_step,
        "checkpoint": str(checkpoint),
        "proportions": seg.manager.proportions.tolist(),
        "names": seg.manager.names,
        "last_train_loss": result.final_train_loss,
    }


def compute_mixture(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    previous: Mapping[str, Any],
) -> dict[str, Any]:
    """Ask the mixer for the next proportions, with the model and mixer state at the end of the previous round."""
    seg = _Segment(train_pool, model_params, train_params, flex, previous["checkpoint"], None)
    model = seg.trainer.accelerator.unwrap_model(seg.trainer.model)
    step = seg.trainer.global_step
    probs = seg.mixer.mix(model, step, dataset=train_pool, data_collator=seg.collator)
    probs = check_proportions(probs, len(seg.manager.names), f"mixer '{flex['component_name']}' output at step {step}")
    stats = seg.mixer.stats() if hasattr(seg.mixer, "stats") else {}
    return {
        "step": step,
        "names": seg.manager.names,
        "proportions": probs.tolist(),
        "mixer_state": seg.mixer.state_dict(),
        **({"stats": stats} if stats else {}),
    }


def finalize(
    last: Mapping[str, Any],
    mixtures: list[Mapping[str, Any]],
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
) -> dict[str, Any]:
    """Save the final adapter / model, write OUTPUT_DIR/mixture/proportions.jsonl; return the train result."""
    seg = _Segment(train_pool, model_params, train_params, {**flex, "static_mix": True}, last["checkpoint"], None)
    out = Path(seg.args.output_dir)
    kind = "adapter" if model_params["finetuning_type"] == "lora" else "model"
    save_trained(seg.trainer.accelerator.unwrap_model(seg.trainer.model), out / kind, tokenizer=seg.tokenizer)
    init = {"step": 0, "names": last["names"], "proportions": _initial(train_pool, flex, seg.args.seed)}
    lines = [init, *({k: m[k] for k in ("step", "names", "proportions", "stats") if k in m} for m in mixtures)]
    atomic_write_text(out / "mixture" / "proportions.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    state = json.loads((Path(last["checkpoint"]) / "trainer_state.json").read_text())
    history = state["log_history"]
    mixer_state = state.get("components", {}).get("mixer") or {}
    extra: dict[str, Any] = {}
    if "alpha_sum" in mixer_state:  # DoReMi: the averaged domain weights are the result of the proxy run
        alpha_sum = mixer_state["alpha_sum"]
        extra["doremi_average_weights"] = [a / sum(alpha_sum) for a in alpha_sum]
        atomic_write_text(
            out / "mixture" / "doremi_weights.json",
            json.dumps(
                {
                    "names": last["names"],
                    "average_weights": extra["doremi_average_weights"],
                    "final_alpha": mixer_state["alpha"],
                    "updates": mixer_state["updates"],
                },
                indent=2,
            )
            + "\n",
        )
    final_loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    return {
        "train_type": "dynamic_mix",
        "component_name": None if flex.get("static_mix") else flex.get("component_name"),
        "output_dir": str(out),
        "finetuning_type": model_params["finetuning_type"],
        "model_name_or_path": model_params["model_name_or_path"],
        f"{kind}_dir": str(out / kind),
        "domains": last["names"],
        "global_step": state["global_step"],
        "train_samples_seen": state["samples_seen"],
        "train_tokens_seen": state["tokens_seen"],
        "final_train_loss": final_loss,
        "train_loss_mean": state["loss_sum_all"] / max(state["global_step"], 1),
        "log_history": history,
        "mixture_history": lines,
        "last_checkpoint": last["checkpoint"],
        **extra,
    }


MetricsSink = Callable[[dict[str, float], int], None]


def run_single_segment(
    train_pool: Any,
    model_params: Mapping[str, Any],
    train_params: Mapping[str, Any],
    flex: Mapping[str, Any],
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """A whole mixed run in one segment (static mixing, or the DoReMi proxy), finalized."""
    state = train_segment(train_pool, model_params, train_params, flex, 0, metrics_sink=metrics_sink)
    return finalize(state, [], train_pool, model_params, train_params, flex)


def doremi_flex(
    flex: Mapping[str, Any], step: str, reference_dir: str | None = None, weights: list[float] | None = None
) -> dict[str, Any]:
    """The config of each DoReMi step: 'reference' and 'final' are static mixes (at the initial proportions, at
    the proxy's averaged weights); 'proxy' trains with the doremi mixer against the reference."""
    base = {**flex, "train_type": "dynamic_mix", "mixture_sample_rule": "mixture"}
    if step == "reference":
        return {**base, "static_mix": True}
    if step == "final":
        return {**base, "static_mix": True, "init_mixture_proportions": weights}
    mixers = dict((flex.get("components") or {}).get("mixers") or {})
    entry = mixers.get("doremi") or {"name": "doremi", "params": {}}
    params = {**(entry.get("params") or {}), "reference_model_path": reference_dir}
    components = {**(flex.get("components") or {}), "mixers": {**mixers, "doremi": {**entry, "params": params}}}
    return {**base, "static_mix": False, "single_segment": True, "component_name": "doremi", "components": components}


def _initial(train_pool: Any, flex: Mapping[str, Any], seed: int) -> list[float]:
    return build_manager(train_pool, flex, seed)[0].proportions.tolist()
