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

`mixer_eval_dataset` (one held-out set per domain, tokenised by the data-processing pipeline as `mixer_eval_sets`)
reaches the mixer as the runtime object `mixer_eval_dataset` (domain name -> its set) and as the manager's
`mixer_eval_datasets` (DataFlex's name); None when not configured.
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
    "check_mixer_data",
    "check_mixer_model",
    "compute_mixture",
    "doremi_config",
    "doremi_proxy_model",
    "finalize",
    "mixer_eval_datasets",
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
    if num_domains is not None and flex.mixer_eval_dataset is not None:
        from dataflex.data.dataset_info import parse_dataset_names

        evals = parse_dataset_names(flex.mixer_eval_dataset, "mixer_eval_dataset")
        if len(evals) != num_domains:
            raise ConfigError(
                f"mixer_eval_dataset names {len(evals)} set(s) but dataset has {num_domains} domains; "
                "give one held-out set per domain, in the order of dataset"
            )
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


def mixer_eval_datasets(flex: Any, names: list[str], sets: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Domain name -> its `mixer_eval_dataset` set (the i-th set for the i-th domain), or None when none is
    configured. `sets` are the tokenised sets by their dataset_info name (the `mixer_eval_sets` catalog entry)."""
    if flex.mixer_eval_dataset is None:
        return None
    from dataflex.data.dataset_info import parse_dataset_names

    evals = parse_dataset_names(flex.mixer_eval_dataset, "mixer_eval_dataset")
    if len(evals) != len(names):
        raise ConfigError(f"mixer_eval_dataset names {len(evals)} set(s) but dataset has {len(names)} domains")
    missing = [e for e in evals if sets is None or e not in sets]
    if missing:
        raise ConfigError(
            f"mixer_eval_dataset set(s) {', '.join(missing)} were not built; pass the data-processing output "
            "mixer_eval_sets (mixer_eval_sets=) to the mix functions"
        )
    return {name: sets[e] for name, e in zip(names, evals)}


def _mixer_class(flex: Any) -> tuple[str, type, dict[str, Any]] | None:
    """(name, class, params with the constructor's defaults) of the run's mixer, or None without one."""
    if flex.train_type != "dynamic_mix" or flex.static_mix or not flex.component_name:
        return None
    import inspect

    name, params = component_for(flex, "mixer")
    cls = REGISTRY.get("mixer", name)
    defaults = {
        p.name: p.default
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.default is not p.empty
    }
    return name, cls, {**defaults, **params}


def check_mixer_model(rc: Any, name: str) -> None:
    """A mixer that reads the router (`needs_router`, e.g. dynamic_moe) refuses a model without one, at config
    time (on the model's config.json; a model still to be built or downloaded is checked when loaded)."""
    from pathlib import Path

    cls = REGISTRY.get("mixer", name)
    path = rc.model.model_name_or_path
    if getattr(cls, "needs_router", False) and path and Path(path).is_dir():
        from dataflex.models.loader import check_router

        check_router(path, f"mixer '{name}'", needs_loads=True)


def check_mixer_data(cfg: Any, domain_sizes: Mapping[str, int]) -> None:
    """The mixer's checks of the tokenised pool (its `check_data(params, sizes, has_eval_sets)`, e.g. a domain too
    small to split an eval sample off), run by the data-processing node before the pool is written."""
    found = _mixer_class(cfg.dataflex)
    check = getattr(found[1], "check_data", None) if found else None
    if callable(check):
        check(found[2], dict(domain_sizes), cfg.dataflex.mixer_eval_dataset is not None)


class MixMode(Mode):
    name = "dynamic_mix"

    def __init__(
        self,
        cfg: Any,
        pool_size: int,
        *,
        single_segment: bool = False,
        mixer_eval_sets: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg, pool_size)
        self.schedule = mix_schedule(cfg.dataflex, cfg.train, pool_size, single_segment=single_segment)
        self.mixer: Any = None
        self.inputs: compat.MixerInputs | None = None
        self.mixer_eval_sets = mixer_eval_sets

    def components(self, run: Run) -> dict[str, Callback]:
        self.manager, self.offsets = build_manager(run.pool, self.cfg.dataflex, run.args.seed)
        if self.cfg.dataflex.static_mix:
            return {}
        self.component, params = component_for(self.cfg.dataflex, "mixer")
        evals = mixer_eval_datasets(self.cfg.dataflex, self.manager.names, self.mixer_eval_sets)
        self.manager.mixer_eval_datasets = evals
        runtime = run.runtime(mixture_manager=self.manager, output_dir=run.args.output_dir, mixer_eval_dataset=evals)
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
    mixer_eval_sets: Mapping[str, Any] | None = None,
    eval_sets: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train round `round_k` (from `previous` round's state, at `mixture`'s proportions); returns this round's
    state. The last round, or the round early stopping ended (evaluated on `eval_sets`), also saves the trained
    adapter / model and carries the run's summary; the rounds after an early stop carry that state unchanged."""
    if previous is not None and previous.get("stopped"):
        return {**previous, "round": round_k}
    mode = MixMode(cfg, len(pool), single_segment=single_segment, mixer_eval_sets=mixer_eval_sets)
    resume = previous and previous["checkpoint"]
    run = Run(cfg, pool, mode, eval_sets=eval_sets, resume=resume, metrics_sink=metrics_sink)
    start, end = mode.schedule.start(round_k), mode.schedule.boundaries[round_k]
    if run.global_step != start:
        raise ConfigError(f"round {round_k} starts at step {start} but its input state is at {run.global_step}")
    if mixture is not None:
        if mode.mixer is not None:
            mode.mixer.load_state_dict(mixture.get("mixer_state") or {})
        mode.manager.set_proportions(mixture["proportions"])
    mode.manager.start_window()  # the next mix sees this round's rows as its `dataset`
    # What round 0's first step draws with: a mixer may set its own (ODM's initial_proportions), so the step-0 line
    # of the history is read here, not rebuilt from init_mixture_proportions.
    initial = mode.manager.proportions.tolist() if round_k == 0 else (previous or {}).get("initial_proportions")
    result = run.train(until_step=end)
    state = {
        "round": round_k,
        "step": result.global_step,
        "checkpoint": str(run.save_state()),
        "proportions": mode.manager.proportions.tolist(),
        "names": mode.manager.names,
        "last_train_loss": result.final_train_loss,
        "initial_proportions": initial,
        "stopped": run.trainer.stopping(),
    }
    if end >= mode.schedule.max_steps or state["stopped"]:
        if mode.mixer is not None:
            compat.finish_mixer(mode.mixer, run.args.output_dir, run.accelerator)
        extra = {"last_checkpoint": state["checkpoint"], **_doremi_result(mode)}
        if cfg.dataflex.static_mix:
            extra["component_name"] = None
        state["summary"] = run.finish(result, **extra).to_summary()
        if state["initial_proportions"] is None:  # a round state written before it was recorded: the config's
            state["initial_proportions"] = build_manager(pool, cfg.dataflex, cfg.train.seed)[0].proportions.tolist()
    return state


def _doremi_result(mode: MixMode) -> dict[str, Any]:
    """DoReMi: the averaged domain weights are the result of the proxy run (what step 3 trains on)."""
    stats = mode.mixer.stats() if mode.mixer is not None else {}
    if "average_weights" not in stats:
        return {}
    return {"doremi_average_weights": stats["average_weights"], "doremi_stats": stats}


def compute_mixture(
    cfg: Any, pool: Any, previous: dict[str, Any], mixer_eval_sets: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The mixer's next proportions, with the model and mixer state at the end of the previous round. `mix` gets the
    keywords it accepts of DataFlex's: the last training micro-batch (`batch`, its `domain_ids`), the collator, and
    the rows drawn in the previous round (`dataset`)."""
    if previous.get("stopped"):  # early stopping ended the run: no more updates
        return {"step": previous["step"], "names": previous["names"], "skipped": True}
    mode = MixMode(cfg, len(pool), mixer_eval_sets=mixer_eval_sets)
    run = Run(cfg, pool, mode, resume=previous["checkpoint"], evaluate=False)
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
    updates = [m for m in mixtures if not m.get("skipped")]
    lines = [init, *({k: m[k] for k in ("step", "names", "proportions", "stats") if k in m} for m in updates)]
    stats = summary.pop("doremi_stats", None)
    if stats is not None:
        summary["doremi"] = {
            "names": last["names"],
            "average_weights": stats["average_weights"],
            "final_alpha": stats["alpha"],
            "updates": stats["updates"],
        }
    return {**summary, "mixture_history": lines}


def run_all(
    cfg: Any,
    pool: Any,
    metrics_sink: MetricsSink | None = None,
    mixer_eval_sets: Mapping[str, Any] | None = None,
    eval_sets: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every round in order (what the Kedro pipeline unrolls), for use without Kedro."""
    n = mix_schedule(cfg.dataflex, cfg.train, len(pool)).num_rounds
    state = train_segment(cfg, pool, 0, metrics_sink=metrics_sink, mixer_eval_sets=mixer_eval_sets, eval_sets=eval_sets)
    mixtures = []
    for k in range(1, n):
        if state.get("stopped"):
            break
        mixtures.append(compute_mixture(cfg, pool, state, mixer_eval_sets=mixer_eval_sets))
        state = train_segment(
            cfg,
            pool,
            k,
            state,
            mixtures[-1],
            metrics_sink=metrics_sink,
            mixer_eval_sets=mixer_eval_sets,
            eval_sets=eval_sets,
        )
    return finalize(state, mixtures)


def run_single_segment(
    cfg: Any, pool: Any, metrics_sink: MetricsSink | None = None, eval_sets: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A whole mixed run in one segment (a static mix, or the DoReMi proxy), finalized."""
    state = train_segment(cfg, pool, 0, single_segment=True, metrics_sink=metrics_sink, eval_sets=eval_sets)
    return finalize(state, [])


def doremi_proxy_model(cfg: Any) -> str:
    """The model DoReMi's reference and proxy train (`doremi.proxy_model_name_or_path`, else the final model)."""
    return cfg.doremi.proxy_model_name_or_path or cfg.model.model_name_or_path


def doremi_config(cfg: Any, step: str, reference_dir: str | None = None, weights: list[float] | None = None) -> Any:
    """The config of each DoReMi step: 'reference' and 'final' are static mixes (at the initial proportions, at
    the proxy's averaged weights); 'proxy' trains with the doremi mixer against the reference. Reference and
    proxy train the small proxy model (the excess loss compares two models of the same size); 'final' trains
    `model_name_or_path` on the proxy's weights, as in DoReMi (a 280M proxy's weights train an 8B model)."""
    flex = replace(cfg.dataflex, train_type="dynamic_mix", mixture_sample_rule="mixture")
    if step in ("reference", "proxy"):
        cfg = replace(cfg, model=replace(cfg.model, model_name_or_path=doremi_proxy_model(cfg)))
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
