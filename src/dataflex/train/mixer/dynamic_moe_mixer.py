"""`dynamic_moe` mixer: dynamic data mixing for mixture-of-experts models by their gate loads (Zhu et al., NAACL
2025, "Dynamic Data Mixing Maximizes Instruction Tuning for Mixture-of-Experts"; DataFlex's Algorithm 1,
"DynamicSampling").

At each mixture update, for each domain i the model runs in eval mode, without gradients, over a fixed eval
sample of that domain (`collect_steps` batches of `eval_batch_size`, the same rows at every update) and the
router's expert loads are summed over layers and non-padding tokens, then L1-normalised: Ô_i ∈ Δ^E. Then
  Δ_i    = mean_j ‖Ô_i − Ô_j‖₂              (j over all domains, the self-distance 0 included)
  α      = softmax(log(w_prev + 1e-10) + η·Δ)
  w      = (1 − c)·α + c/|D|
with w starting uniform. A domain whose tokens are routed unlike the others' gains weight.

The load is the top-k routing count, as LLaMA-MoE's `gate_load` (the paper's model): each non-padding token adds 1
to each of the k experts it is routed to, in every MoE layer. From a transformers MoE model (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, ...) it is read from `output_router_logits=True`: per layer, the top-k of softmax(router logits)
with k the config's `num_experts_per_tok`, as those routers choose (models whose routing adds a bias or group limit
to the logits, DeepSeek-V3 style, are counted on the plain logits). A model that returns LLaMA-MoE's own
`gate_load` (one count vector per layer) is summed over layers as it is; that count includes padding.

Eval rows: the `mixer_eval_dataset` sets when given (one per domain, in the order of `dataset`), else
`eval_samples` rows per domain split off the training pool with a fixed seed (they are then never trained on);
from each, min(its size, collect_steps × eval_batch_size) rows drawn once with a fixed seed. Weights, loads and
eval rows are in TrainState. Under several processes the eval batches are shared out and the counts summed over
processes, so every process computes the same loads (integer counts: the sum does not depend on the split).

Files in the run's output_dir: DataFlex's `dynamic_moe_weights.jsonl` (a line per update: `step`, `timestamp`,
`domain_names`, `gate_loads`, `delta`, `alpha`, `new_weights`, `eta`, `c`) and `mixture/expert_loads.png`
(domain × expert heat maps of Ô at the first and the latest update).
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataflex.compat import StepLog
from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.core.registry import register_mixer
from dataflex.utils.logging import logger

from .base_mixer import Mixer

# Fixed seeds (DataFlex's): the eval split and the eval rows do not change with the run's seed.
EVAL_SPLIT_SEED = 0
EVAL_DRAW_SEED = 42


def dynamic_sampling_update(
    loads: np.ndarray, w_prev: np.ndarray, eta: float, c: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of Algorithm 1 on normalised loads Ô (domains × experts): (new weights, Δ, α)."""
    loads = np.asarray(loads, dtype=np.float64)
    k = loads.shape[0]
    dist = np.linalg.norm(loads[:, None, :] - loads[None, :, :], axis=2)
    delta = dist.mean(axis=1)  # includes the self-distance 0, as the paper's mean over all j
    logits = np.log(np.asarray(w_prev, dtype=np.float64) + 1e-10) + eta * delta
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    w = (1.0 - c) * alpha + c / k
    return w / w.sum(), delta, alpha


def expert_counts(
    router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    """(E,) float64: per expert, the number of (non-padding token, layer) pairs routed to it by top-k of each
    layer's softmax(router logits) (layers × tokens × E logits, each layer (tokens, E) or (batch, seq, E))."""
    total: torch.Tensor | None = None
    for layer in router_logits:
        if layer is None:
            continue
        flat = layer.reshape(-1, layer.shape[-1])
        if attention_mask is not None:
            keep = attention_mask.reshape(-1).to(flat.device).bool()
            if keep.numel() != flat.shape[0]:
                raise RuntimeError(
                    f"router logits have {flat.shape[0]} rows but the batch has {keep.numel()} token positions"
                )
            flat = flat[keep]
        chosen = torch.topk(torch.softmax(flat.float(), dim=-1), top_k, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=flat.shape[-1]).to(torch.float64)
        total = counts if total is None else total + counts
    if total is None:
        raise ConfigError("mixer 'dynamic_moe': the model returned no router logits (no MoE layer ran)")
    return total


def _summed_gate_load(gate_load: Any) -> torch.Tensor:
    """LLaMA-MoE's `gate_load` (one (E,) count per layer, or a stacked tensor) summed over layers."""
    if isinstance(gate_load, list | tuple):
        return torch.stack([torch.as_tensor(g).detach().reshape(-1).double().cpu() for g in gate_load]).sum(0)
    t = torch.as_tensor(gate_load).detach().double().cpu()
    return t.reshape(-1, t.shape[-1]).sum(0)


def _accepts(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def batch_gate_load(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], top_k: int | None) -> torch.Tensor:
    """(E,) float64 expert loads of one batch (eval mode, no grad is the caller's): router_logits top-k counts
    over non-padding tokens, else the model's own `gate_load`."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if _accepts(model.forward, "output_router_logits"):
        kwargs["output_router_logits"] = True
    if _accepts(model.forward, "use_cache"):
        kwargs["use_cache"] = False
    outputs = model(**kwargs)
    router_logits = getattr(outputs, "router_logits", None)
    if router_logits:
        if top_k is None:
            raise ConfigError(
                "mixer 'dynamic_moe': the model's config names no experts-per-token (num_experts_per_tok)"
            )
        return expert_counts(router_logits, batch.get("attention_mask"), top_k).cpu()
    gate_load = getattr(outputs, "gate_load", None)
    if gate_load is not None:
        return _summed_gate_load(gate_load)
    raise ConfigError(
        f"mixer 'dynamic_moe' needs a mixture-of-experts model; {type(model).__name__} returns neither "
        "router_logits nor gate_load"
    )


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model without a DDP wrapper (`module`); a PeftModel stays (its forward passes router flags on)."""
    return getattr(model, "module", model)


def _config_of(model: torch.nn.Module) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return (get_base() if callable(get_base) else model).config


@register_mixer("dynamic_moe")
class DynamicMoEMixer(Mixer):
    """Gate-load-balanced dynamic mixing (module doc). DataFlex's parameter names and defaults."""

    needs_router = True  # the config check refuses a model without one (dataflex.train.modes.mix)

    def __init__(
        self,
        mixture_manager: Any,
        eta: float = 10.0,
        c: float = 0.05,
        collect_steps: int = 10,
        eval_samples: int = 1000,
        eval_batch_size: int = 32,
        output_dir: str | None = None,
        accelerator: Any = None,
        data_collator: Any = None,
    ) -> None:
        super().__init__(mixture_manager)
        names = list(mixture_manager.names)
        if len(names) < 2:
            raise ConfigError("mixer 'dynamic_moe' needs at least two domains")
        self.check_params(locals())
        self.eta, self.c = float(eta), float(c)
        self.collect_steps, self.eval_batch_size = int(collect_steps), int(eval_batch_size)
        self.accelerator, self.data_collator = accelerator, data_collator
        given = getattr(mixture_manager, "mixer_eval_datasets", None)
        self.check_data(locals(), mixture_manager.sizes, given is not None)
        if given is not None:
            self.eval_source = "mixer_eval_dataset"
            self.eval_sets = [given[n] for n in names]
        else:
            self.eval_source = "split"
            self.eval_sets = self._split_off(mixture_manager, int(eval_samples))
        self.eval_rows = self._draw_rows()
        k = len(names)
        self.weights = np.full(k, 1.0 / k)
        self.updates = 0
        self.first: dict[str, Any] | None = None  # {"step", "loads"}: the heat map's first panel
        self.last: dict[str, Any] | None = None  # the latest update's loads, delta, alpha
        self._batches: list[list[dict[str, torch.Tensor]]] | None = None  # collated once, on first use
        self.output_dir = Path(output_dir) if output_dir else None
        self.weights_log = StepLog(self.output_dir / "dynamic_moe_weights.jsonl") if self.output_dir else None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        if not params["eta"] > 0:
            raise ConfigError(f"mixer 'dynamic_moe': eta must be > 0, got {params['eta']}")
        if not 0 <= params["c"] <= 1:
            raise ConfigError(f"mixer 'dynamic_moe': c must be in [0, 1], got {params['c']}")
        for key in ("collect_steps", "eval_samples", "eval_batch_size"):
            if params[key] < 1:
                raise ConfigError(f"mixer 'dynamic_moe': {key} must be >= 1, got {params[key]}")

    @classmethod
    def check_data(cls, params: Mapping[str, Any], sizes: Mapping[str, int], has_eval_sets: bool) -> None:
        """Without `mixer_eval_dataset` each domain gives `eval_samples` rows to the eval split: at most half."""
        if has_eval_sets:
            return
        n_eval = int(params["eval_samples"])
        for name, n in sizes.items():
            if n_eval > n // 2:
                raise ConfigError(
                    f"mixer 'dynamic_moe': domain '{name}' has {n} rows, too few to split off eval_samples={n_eval} "
                    f"(at most half a domain, {n // 2} here); lower eval_samples or give mixer_eval_dataset"
                )

    # -- eval data -------------------------------------------------------------------------------------

    @staticmethod
    def _split_off(manager: Any, n_eval: int) -> list[Any]:
        """`n_eval` rows per domain, drawn with a fixed seed, taken out of training (DataFlex's split)."""
        if manager.sources is None:
            raise ConfigError("mixer 'dynamic_moe' needs the mixture manager's sources (its per-domain rows)")
        held, sets = {}, []
        for d, name in enumerate(manager.names):
            source = manager.sources[name]
            rows = np.random.default_rng([EVAL_SPLIT_SEED, d]).permutation(len(source))[:n_eval]
            held[name] = sorted(int(r) for r in rows)
            sets.append(source.select(held[name]))
        manager.hold_out(held)
        return sets

    def _draw_rows(self) -> dict[str, list[int]]:
        """Per domain, the eval set's rows every update runs on: collect_steps × eval_batch_size of them (all
        when the set is smaller), drawn once with a fixed seed."""
        want = self.collect_steps * self.eval_batch_size
        rows = {}
        for d, (name, ds) in enumerate(zip(self.mixture_manager.names, self.eval_sets)):
            if len(ds) < 1:
                raise ConfigError(f"mixer 'dynamic_moe': the eval set of domain '{name}' is empty")
            n = min(len(ds), want)
            picked = np.random.default_rng([EVAL_DRAW_SEED, d]).choice(len(ds), n, replace=False)
            rows[name] = sorted(int(r) for r in picked)
        return rows

    def _eval_batches(self, collator: Any) -> list[list[dict[str, torch.Tensor]]]:
        if self._batches is None:
            bs, out = self.eval_batch_size, []
            for name, ds in zip(self.mixture_manager.names, self.eval_sets):
                rows = self.eval_rows[name]
                batches = []
                for i in range(0, len(rows), bs):
                    batch = collator([ds[r] for r in rows[i : i + bs]])
                    batches.append({k: batch[k] for k in ("input_ids", "attention_mask") if k in batch})
                out.append(batches)
            self._batches = out
        return self._batches

    # -- gate loads ------------------------------------------------------------------------------------

    def gate_loads(self, model: torch.nn.Module, collator: Any) -> np.ndarray:
        """Raw expert load counts, domains × experts, identical on every process."""
        net = _unwrapped(model)
        top_k = _router_top_k(net)
        acc = self.accelerator
        world = acc.num_processes if acc is not None else 1
        rank = acc.process_index if acc is not None else 0
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()  # no router noise / jitter, no dropout
        per_domain: list[torch.Tensor | None] = []
        try:
            with torch.no_grad():
                for batches in self._eval_batches(collator):
                    total = None
                    for b, batch in enumerate(batches):
                        if b % world != rank:  # batches shared out round-robin; the counts are summed below
                            continue
                        counts = batch_gate_load(net, {k: v.to(device) for k, v in batch.items()}, top_k)
                        total = counts if total is None else total + counts
                    per_domain.append(total)
        finally:
            net.train(was_training)
        num_experts = max((t.numel() for t in per_domain if t is not None), default=0)
        if world > 1:
            # Every rank needs the expert count to size the sum; a rank that ran no batch knows none.
            size = torch.tensor([num_experts], dtype=torch.int64, device=acc.device)
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
            num_experts = int(size.item())
        loads = torch.zeros(len(per_domain), num_experts, dtype=torch.float64)
        for d, t in enumerate(per_domain):
            if t is not None:
                loads[d] = t
        if world > 1:
            loads = acc.reduce(loads.to(acc.device), reduction="sum").cpu()
        return loads.numpy()

    # -- the update ------------------------------------------------------------------------------------

    def mix(self, model: torch.nn.Module, step_id: int, data_collator: Any = None, **kwargs: Any) -> np.ndarray:
        collator = data_collator or self.data_collator
        if collator is None:
            raise ConfigError("mixer 'dynamic_moe' needs the run's data_collator to batch its eval rows")
        names = self.mixture_manager.names
        raw = self.gate_loads(model, collator)
        sums = raw.sum(axis=1)
        empty = [n for n, s in zip(names, sums) if s <= 0]
        if empty:
            raise ConfigError(f"mixer 'dynamic_moe': no token of domain(s) {', '.join(empty)} reached an expert")
        loads = raw / sums[:, None]
        w, delta, alpha = dynamic_sampling_update(loads, self.weights, self.eta, self.c)
        self.weights = w
        self.updates += 1
        self.last = {"step": int(step_id), "loads": loads.tolist(), "delta": delta.tolist(), "alpha": alpha.tolist()}
        if self.first is None:
            self.first = {"step": int(step_id), "loads": loads.tolist()}
        logger.info(
            "[DynamicMoEMixer] step %d: delta %s -> weights %s",
            step_id,
            np.round(delta, 4).tolist(),
            np.round(w, 4).tolist(),
        )
        if self.accelerator is None or self.accelerator.is_main_process:
            self._write_files(step_id, loads, delta, alpha, w)
        return w.copy()

    def _write_files(self, step: int, loads: np.ndarray, delta: np.ndarray, alpha: np.ndarray, w: np.ndarray) -> None:
        names = self.mixture_manager.names
        if self.weights_log is not None:
            self.weights_log.append(
                {
                    "step": int(step),
                    "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "domain_names": list(names),
                    "gate_loads": {n: loads[i].tolist() for i, n in enumerate(names)},
                    "delta": {n: float(delta[i]) for i, n in enumerate(names)},
                    "alpha": {n: float(alpha[i]) for i, n in enumerate(names)},
                    "new_weights": {n: float(w[i]) for i, n in enumerate(names)},
                    "eta": self.eta,
                    "c": self.c,
                }
            )
        if self.output_dir is not None and self.first is not None:
            from dataflex.reporting import expert_load_heatmaps

            panels = [(self.first["step"], np.asarray(self.first["loads"]))]
            if step != self.first["step"]:
                panels.append((int(step), loads))
            fig = expert_load_heatmaps(list(names), panels)
            path = self.output_dir / "mixture" / "expert_loads.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
            fig.savefig(tmp)
            os.replace(tmp, path)
            import matplotlib.pyplot as plt

            plt.close(fig)

    # -- records and state -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        if self.last is None:
            return {}
        return {
            "gate_loads": self.last["loads"],
            "delta": self.last["delta"],
            "alpha": self.last["alpha"],
            "weights": self.weights.tolist(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "updates": self.updates,
            "first": self.first,
            "last": self.last,
            "eval_source": self.eval_source,
            "eval_rows": self.eval_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("eval_source") != self.eval_source or state.get("eval_rows") != self.eval_rows:
            raise CheckpointError(
                "mixer 'dynamic_moe': the checkpoint measured gate loads on other eval rows (mixer_eval_dataset, "
                "eval_samples, collect_steps or eval_batch_size changed); resume with the same settings"
            )
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.first, self.last = state.get("first"), state.get("last")


def _router_top_k(model: torch.nn.Module) -> int | None:
    from dataflex.models.loader import router_top_k

    return router_top_k(_config_of(model))
