"""`dynamic_mix`: the run is cut at the mixer's updates (`dataflex.train.schedule.mix_schedule`).

Round 0 trains `warmup_step` steps at the initial proportions; round r ≥ 1 asks the mixer for proportions
(`compute_mixture`) and trains the next `update_step` steps (`train_segment`). Each segment resumes the previous
one's TrainState, so the chain equals one run (one LR schedule, one sampler state). With `static_mix: true` there
is one segment at the initial proportions and no mixer; DoReMi's proxy is one segment whose mixer acts inside the
loop (its own loss strategy). Kedro unrolls the rounds as `dynamic_mix.round_<k>`; `run_all` runs them without it.

Mixers get what DataFlex's MixTrainer gave them (`dataflex.compat`): `output_dir` at construction, `mix(model,
step_id, batch=, domain_ids=, data_collator=, dataset=)` with the last training micro-batch and the rows drawn in the
round that just ended, and their optional hooks (`update_batch_info` each micro-batch, `get_current_doremi_weights`
for the loss, `save_average_weights` when the run ends).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from dataflex import compat
from dataflex.core.errors import ConfigError
from dataflex.core.registry import REGISTRY
from dataflex.data import domain_names
from dataflex.distributed.launch import MetricsSink, distributable
from dataflex.train.dataset.mixed_proportion_manager import RULES, MixedProportionManager, check_proportions
from dataflex.train.modes import component_for
from dataflex.train.run import Mode, Run
from dataflex.train.schedule import mix_schedule
from dataflex.train.trainer import Callback, LossStrategy
from dataflex.train.trainer.plan import MixturePlan

__all__ = [
    "MixMode",
    "build_manager",
    "check_mix_config",
    "compute_mixture",
    "doremi_config",
    "finalize",
    "run_all",
    "run_single_segment",
    "train_segment",
]


def check_mix_config(flex: Any, num_domains: int | None = None) -> None:
    """Mix-specific config errors, before any work."""
    rule = flex.mixture_sample_rule or "mixture"
    if rule not in RULES:
        raise ConfigError(f"mixture_sample_rule '{rule}' is not valid; use one of {', '.join(RULES)}")
    if num_domains is not None and flex.init_mixture_proportions is not None:
        check_proportions(flex.init_mixture_proportions, num_domains, "init_mixture_proportions")
    if flex.static_mix:
        return
    if rule != "mixture":
        raise ConfigError(
            f"mixture_sample_rule '{rule}' fixes the proportions, so a dynamic mixer could not change them; "
            "use 'mixture' or set static_mix: true"
        )
    if num_domains is not None and num_domains < 2:
        raise ConfigError("dynamic_mix with a mixer needs at least two domains (datasets in `dataset`)")
    for key in ("warmup_step", "update_step"):
        if getattr(flex, key) < 1:
            raise ConfigError(f"dynamic_mix needs {key} >= 1, got {getattr(flex, key)}")


def build_manager(pool: Any, flex: Any, seed: int) -> tuple[MixedProportionManager, list[int]]:
    """The proportion manager over the pool's domains (each domain's rows are its `sources` entry), and where each
    domain's rows start in the pool (the pool is built domain by domain)."""
    names = domain_names(pool)
    sizes = [0] * len(names)
    for d in pool["domain_id"]:
        sizes[d] += 1
    offsets = [sum(sizes[:k]) for k in range(len(names))]
    init = flex.init_mixture_proportions
    if init is not None:
        check_proportions(init, len(names), "init_mixture_proportions")
    sources = {n: pool.select(range(o, o + s)) for n, o, s in zip(names, offsets, sizes)}
    manager = MixedProportionManager(
        names, sizes, rule=flex.mixture_sample_rule or "mixture", init_proportions=init, seed=seed, sources=sources
    )
    return manager, offsets


class MixMode(Mode):
    name = "dynamic_mix"

    def __init__(self, cfg: Any, pool_size: int, *, single_segment: bool = False) -> None:
        super().__init__(cfg, pool_size)
        self.schedule = mix_schedule(cfg.dataflex, cfg.train, pool_size, single_segment=single_segment)
        self.mixer: Any = None
        self.inputs: compat.MixerInputs | None = None

    def components(self, run: Run) -> dict[str, Callback]:
        self.manager, self.offsets = build_manager(run.pool, self.cfg.dataflex, run.args.seed)
        if self.cfg.dataflex.static_mix:
            return {}
        self.component, params = component_for(self.cfg.dataflex, "mixer")
        runtime = run.runtime(mixture_manager=self.manager, output_dir=run.args.output_dir)
        self.mixer = REGISTRY.build("mixer", self.component, runtime=runtime, cfg=params)
        self.inputs = compat.MixerInputs(self.mixer)
        return {"mixer": self.mixer, "mixer_inputs": self.inputs}

    def plan(self, run: Run) -> MixturePlan:
        args = run.args
        return MixturePlan(
            self.manager,
            self.offsets,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps * args.num_processes,
            num_steps=self.schedule.max_steps,
        )

    def loss(self, run: Run) -> LossStrategy | None:
        if self.mixer is None:
            return None
        return self.mixer.loss_strategy() or compat.mixer_loss(self.mixer)


@distributable
def train_segment(
    cfg: Any,
    pool: Any,
    round_k: int,
    previous: dict[str, Any] | None = None,
    mixture: dict[str, Any] | None = None,
    single_segment: bool = False,
    metrics_sink: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train round `round_k` (from `previous` round's state, at `mixture`'s proportions); returns this round's
    state. The last round also saves the trained adapter / model and carries the run's summary."""
    mode = MixMode(cfg, len(pool), single_segment=single_segment)
    run = Run(cfg, pool, mode, resume=previous and previous["checkpoint"], metrics_sink=metrics_sink)
    start, end = mode.schedule.start(round_k), mode.schedule.boundaries[round_k]
    if run.global_step != start:
        raise ConfigError(f"round {round_k} starts at step {start} but its input state is at {run.global_step}")
    if mixture is not None:
        if mode.mixer is not None:
            mode.mixer.load_state_dict(mixture.get("mixer_state") or {})
        mode.manager.set_proportions(mixture["proportions"])
    mode.manager.start_window()  # the next mix sees this round's rows as its `dataset`
    result = run.train(until_step=end)
    state = {
        "round": round_k,
        "step": result.global_step,
        "checkpoint": str(run.save_state()),
        "proportions": mode.manager.proportions.tolist(),
        "names": mode.manager.names,
        "last_train_loss": result.final_train_loss,
    }
    if end >= mode.schedule.max_steps:
        if mode.mixer is not None:
            compat.finish_mixer(mode.mixer, run.args.output_dir, run.accelerator)
        extra = {"last_checkpoint": state["checkpoint"], **_doremi_result(mode)}
        if cfg.dataflex.static_mix:
            extra["component_name"] = None
        state["summary"] = run.finish(result, **extra).to_summary()
        state["initial_proportions"] = build_manager(pool, cfg.dataflex, cfg.train.seed)[0].proportions.tolist()
    return state


def _doremi_result(mode: MixMode) -> dict[str, Any]:
    """DoReMi: the averaged domain weights are the result of the proxy run (what step 3 trains on)."""
    stats = mode.mixer.stats() if mode.mixer is not None else {}
    if "average_weights" not in stats:
        return {}
    return {"doremi_average_weights": stats["average_weights"], "doremi_stats": stats}


def compute_mixture(cfg: Any, pool: Any, previous: dict[str, Any]) -> dict[str, Any]:
    """The mixer's next proportions, with the model and mixer state at the end of the previous round. `mix` gets the
    keywords it accepts of DataFlex's: the last training micro-batch (`batch`, its `domain_ids`), the collator, and
    the rows drawn in the previous round (`dataset`)."""
    mode = MixMode(cfg, len(pool))
    run = Run(cfg, pool, mode, resume=previous["checkpoint"])
    last = mode.inputs.last_batch  # empty only for a checkpoint written before it was recorded
    batch = compat.batch_of(pool, last, run.collator, run.accelerator.device) if last else None
    probs = compat.call_with_accepted(
        mode.mixer.mix,
        run.model,
        run.global_step,
        batch=batch,
        domain_ids=batch.get("domain_id") if batch else None,
        data_collator=run.collator,
        dataset=mode.manager.snapshot(),
    )
    where = f"mixer '{mode.component}' output at step {run.global_step}"
    probs = check_proportions(probs, len(mode.manager.names), where)
    stats = mode.mixer.stats()
    return {
        "step": run.global_step,
        "names": mode.manager.names,
        "proportions": probs.tolist(),
        "mixer_state": mode.mixer.state_dict(),
        **({"stats": stats} if stats else {}),
    }


def finalize(last: Mapping[str, Any], mixtures: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's summary (from the last round) with its mixture history (`mixture_history`: the initial
    proportions, then every mixer update) and, for DoReMi's proxy, its averaged domain weights (`doremi`)."""
    summary = dict(last["summary"])
    init = {"step": 0, "names": last["names"], "proportions": last["initial_proportions"]}
    lines = [init, *({k: m[k] for k in ("step", "names", "proportions", "stats") if k in m} for m in mixtures)]
    stats = summary.pop("doremi_stats", None)
    if stats is not None:
        summary["doremi"] = {
            "names": last["names"],
            "average_weights": stats["average_weights"],
            "final_alpha": stats["alpha"],
            "updates": stats["updates"],
        }
    return {**summary, "mixture_history": lines}


def run_all(cfg: Any, pool: Any, metrics_sink: MetricsSink | None = None) -> dict[str, Any]:
    """Every round in order (what the Kedro pipeline unrolls), for use without Kedro."""
    n = mix_schedule(cfg.dataflex, cfg.train, len(pool)).num_rounds
    state = train_segment(cfg, pool, 0, metrics_sink=metrics_sink)
    mixtures = []
    for k in range(1, n):
        mixtures.append(compute_mixture(cfg, pool, state))
        state = train_segment(cfg, pool, k, state, mixtures[-1], metrics_sink=metrics_sink)
    return finalize(state, mixtures)


def run_single_segment(cfg: Any, pool: Any, metrics_sink: MetricsSink | None = None) -> dict[str, Any]:
    """A whole mixed run in one segment (a static mix, or the DoReMi proxy), finalized."""
    state = train_segment(cfg, pool, 0, single_segment=True, metrics_sink=metrics_sink)
    return finalize(state, [])


def doremi_config(cfg: Any, step: str, reference_dir: str | None = None, weights: list[float] | None = None) -> Any:
    """The config of each DoReMi step: 'reference' and 'final' are static mixes (at the initial proportions, at
    the proxy's averaged weights); 'proxy' trains with the doremi mixer against the reference."""
    flex = replace(cfg.dataflex, train_type="dynamic_mix", mixture_sample_rule="mixture")
    if step == "reference":
        flex = replace(flex, static_mix=True)
    elif step == "final":
        flex = replace(flex, static_mix=True, init_mixture_proportions=list(weights or []))
    else:
        components = dict(flex.components or {})
        mixers = dict(components.get("mixers") or {})
        entry = dict(mixers.get("doremi") or {"name": "doremi", "params": {}})
        entry["params"] = {**(entry.get("params") or {}), "reference_model_path": reference_dir}
        components["mixers"] = {**mixers, "doremi": entry}
        flex = replace(flex, static_mix=False, component_name="doremi", components=components)
    return replace(cfg, dataflex=flex)
