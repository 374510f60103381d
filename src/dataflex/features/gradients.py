"""Per-sample gradient features in one batched forward + backward.

Method: eval mode (LoRA dropout off); samples sorted by length and right-padded to each batch's longest, with
no attention mask (causal attention never looks at the pads that follow a token, and pad labels are -100);
loss = Σ_i (sample i's own token-mean CE), so every per-sample gradient equals the batch-size-1 one. Hooks on
the linear modules that own trainable weights keep each layer's input A and receive its output gradient G; the
per-sample weight gradient is Σ_t G_tᵀ A_t (bias: Σ_t G_t). Per parameter, the gradient is transformed (SGD:
unchanged; Adam: LESS's formula) and projected into the [B, k] fp32 feature as soon as it is complete, so the
extra memory is one module's per-sample gradients, not the whole model's.

Trainable parameters that are not weights or biases of `nn.Linear` (full fine-tuning of embeddings or norms,
DoRA magnitudes) fall back to a per-sample autograd loop with a notice: correct, but B times slower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from dataflex.core.errors import ConfigError, DataError
from dataflex.features.batching import eval_mode, length_sorted_batches
from dataflex.features.optimizer_state import AdamMoments, adam_transform_scaled, resolve_adam_state
from dataflex.features.projectors import Projector
from dataflex.features.token_losses import IGNORE_INDEX, count_supervised_tokens, per_token_losses
from dataflex.utils.logging import logger

GRADIENT_TYPES = ("sgd", "adam", "sign")  # LESS's three: raw, Adam-preconditioned, elementwise sign
FUSED_BUFFER_BYTES = 512 * 2**20  # a batch's per-sample gradients up to this size are transformed in one go
FEATURE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError(
            "the model has no trainable parameters; per-sample gradients need a LoRA adapter or finetuning_type: full"
        )
    return named


def linear_owners(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Linear, str]]:
    """Trainable parameter name -> (module name, nn.Linear, 'weight' | 'bias') for every hookable parameter."""
    owners: dict[int, tuple[str, torch.nn.Linear, str]] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            for attr in ("weight", "bias"):
                p = getattr(mod, attr, None)
                if p is not None and p.requires_grad:
                    owners.setdefault(id(p), (mod_name, mod, attr))
    return {n: owners[id(p)] for n, p in model.named_parameters() if p.requires_grad and id(p) in owners}


def _as_rows(dataset: Any) -> tuple[list[list[int]], list[list[int]]]:
    if isinstance(dataset, Mapping):
        ids, labels = dataset["input_ids"], dataset["labels"]
    else:
        cols = getattr(dataset, "column_names", None)
        if cols is not None:
            missing = {"input_ids", "labels"} - set(cols)
            if missing:
                raise DataError(f"per-sample gradients need columns input_ids and labels; missing {sorted(missing)}")
            ids, labels = dataset["input_ids"], dataset["labels"]
        else:
            ids = [r["input_ids"] for r in dataset]
            labels = [r["labels"] for r in dataset]
    ids = [list(map(int, x)) for x in ids]
    labels = [list(map(int, x)) for x in labels]
    for i, (a, b) in enumerate(zip(ids, labels)):
        if len(a) != len(b):
            raise DataError(f"sample {i}: labels length {len(b)} != input_ids length {len(a)}")
        if not any(t != IGNORE_INDEX for t in b[1:]):
            raise DataError(
                f"sample {i} has no supervised token (all labels are -100 after the shift), so it has no "
                "gradient; drop it or set train_on_prompt / a longer cutoff_len"
            )
    return ids, labels


def _pad(rows: Sequence[list[int]], value: int, device: torch.device) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def per_sample_losses(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] each right-padded row's own masked token-mean CE (fp32), no attention mask."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    tok = per_token_losses(logits, labels)
    count = count_supervised_tokens(labels).clamp(min=1)
    return tok.sum(dim=1) / count


class _Transform:
    """Per-parameter gradient -> feature block (SGD: identity; sign: LESS's `torch.sign`; Adam: LESS's transform
    with this parameter's m, v)."""

    def __init__(self, gradient_type: str, adam: AdamMoments | None, placement: str) -> None:
        self.gradient_type, self.adam, self.placement = gradient_type, adam, placement
        self._scaled: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if self.gradient_type == "sign":
            return torch.sign(g)
        if self.gradient_type == "sgd" or self.adam is None:
            return g
        key = (name, str(g.device))
        if key not in self._scaled:  # β1·m and β2·v once per parameter, not once per batch
            m, v = self.adam.moments[name]
            b1, b2 = self.adam.betas
            self._scaled[key] = (
                b1 * m.to(g.device, torch.float32).reshape(1, -1),
                b2 * v.to(g.device, torch.float32).reshape(1, -1),
            )
        return adam_transform_scaled(g, *self._scaled[key], self.adam.betas, self.adam.eps, self.placement)

    def all(self, names: list[str], g: torch.Tensor) -> torch.Tensor:
        """The transform of every parameter's gradient at once, g = [B, Σ numel] concatenated in `names` order."""
        if self.gradient_type == "sign":
            return torch.sign(g)
        if self.gradient_type == "sgd" or self.adam is None:
            return g
        key = ("*", str(g.device))
        if key not in self._scaled:
            b1, b2 = self.adam.betas
            m = torch.cat([self.adam.moments[n][0].reshape(-1) for n in names]).to(g.device, torch.float32)
            v = torch.cat([self.adam.moments[n][1].reshape(-1) for n in names]).to(g.device, torch.float32)
            self._scaled[key] = (b1 * m.reshape(1, -1), b2 * v.reshape(1, -1))
        return adam_transform_scaled(g, *self._scaled[key], self.adam.betas, self.adam.eps, self.placement)


class _HookedBatch:
    """Forward/backward hooks that turn one batch's backward pass into projected per-sample features."""

    def __init__(
        self,
        owners: dict[str, tuple[str, torch.nn.Linear, str]],
        sizes: dict[str, int],
        emit: Callable[[str, torch.Tensor], None],
    ) -> None:
        self.emit = emit
        self.sizes = sizes
        self.by_module: dict[str, list[tuple[str, str]]] = {}
        self.modules: dict[str, torch.nn.Linear] = {}
        for pname, (mname, mod, attr) in owners.items():
            self.by_module.setdefault(mname, []).append((pname, attr))
            self.modules[mname] = mod
        self.handles: list[Any] = []
        self.calls: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    def __enter__(self) -> _HookedBatch:
        for mname, mod in self.modules.items():
            self.handles.append(mod.register_forward_hook(self._forward_hook(mname)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def reset(self) -> None:
        self.calls.clear()
        self.received.clear()
        self.buffers.clear()

    def _forward_hook(self, mname: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            self.calls[mname] = self.calls.get(mname, 0) + 1
            a = inputs[0].detach()
            output.register_hook(lambda g: self._grad(mname, a, g))

        return hook

    def _grad(self, mname: str, a: torch.Tensor, g: torch.Tensor) -> None:
        b = g.shape[0]
        g32 = g.detach().reshape(b, -1, g.shape[-1]).float()
        for pname, attr in self.by_module[mname]:
            if attr == "weight":
                grad = torch.bmm(g32.transpose(1, 2), a.reshape(b, -1, a.shape[-1]).float()).reshape(b, -1)
            else:
                grad = g32.sum(dim=1)
            # A module called several times in one forward (tied or reused layers) sums its calls' gradients.
            self.buffers[pname] = self.buffers[pname] + grad if pname in self.buffers else grad
        self.received[mname] = self.received.get(mname, 0) + 1
        if self.received[mname] == self.calls[mname]:
            for pname, _ in self.by_module[mname]:
                self.emit(pname, self.buffers.pop(pname))

    def flush(self, batch_size: int, device: torch.device) -> None:
        """Parameters whose gradient never arrived (unused this batch) have a zero gradient."""
        for mname, params in self.by_module.items():
            if self.received.get(mname, 0) < max(self.calls.get(mname, 0), 1):
                for pname, _ in params:
                    grad = self.buffers.pop(pname, None)
                    self.emit(
                        pname, grad if grad is not None else torch.zeros(batch_size, self.sizes[pname], device=device)
                    )


def per_sample_gradient_features(
    model: torch.nn.Module,
    dataset: Any,
    *,
    gradient_type: str = "sgd",
    optimizer_state: Any = None,
    projector: str | Projector = "sjlt",
    proj_dim: int = 8192,
    seed: int = 0,
    batch_size: int = 16,
    adam_eps_placement: str = "inside",
    dtype: torch.dtype | str = torch.float32,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """[N, proj_dim] (or [N, trainable parameters] with projector='none') features, rows in dataset order.

    `dataset` has `input_ids` and `labels`; each sample's loss is its own masked token-mean cross-entropy.
    `gradient_type='adam'` applies LESS's Adam transform with `optimizer_state` (moments by parameter name, a
    torch optimizer or a TrainState directory); betas / eps come from it unless given.
    """
    if gradient_type not in GRADIENT_TYPES:
        raise ConfigError(f"gradient_type must be one of {', '.join(GRADIENT_TYPES)}, got {gradient_type!r}")
    if adam_eps_placement not in ("inside", "outside"):
        raise ConfigError(f"adam_eps_placement must be 'inside' or 'outside', got {adam_eps_placement!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    out_dtype = FEATURE_DTYPES.get(dtype, None) if isinstance(dtype, str) else dtype
    if out_dtype is None:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(FEATURE_DTYPES)}")
    named = trainable_parameters(model)
    sizes = {n: p.numel() for n, p in named}
    proj = projector if isinstance(projector, Projector) else Projector(projector, list(sizes.items()), proj_dim, seed)
    adam = resolve_adam_state(optimizer_state, model, betas=betas, eps=eps) if gradient_type == "adam" else None
    transform = _Transform(gradient_type, adam, adam_eps_placement)
    ids, labels = _as_rows(dataset)
    n = len(ids)
    device = next(p.device for _, p in named)
    out = torch.zeros(n, proj.out_dim, dtype=out_dtype)
    if n == 0:
        return out
    owners = linear_owners(model)
    unsupported = [name for name in sizes if name not in owners]
    with eval_mode(model):
        if unsupported:
            logger.warning(
                "per-sample gradients: %d trainable parameters are not nn.Linear weights (first: %s); "
                "using a per-sample autograd loop (correct but slower)",
                len(unsupported),
                unsupported[0],
            )
            order = [i for batch in length_sorted_batches(ids, 1) for i in batch]
            _loop_features(model, named, ids, labels, order, proj, transform, out, device, progress)
        else:
            _hooked_features(
                model,
                named,
                owners,
                sizes,
                ids,
                labels,
                length_sorted_batches(ids, batch_size),
                proj,
                transform,
                out,
                device,
                progress,
            )
    return out


def _hooked_features(
    model: torch.nn.Module,
    named: list[tuple[str, torch.nn.Parameter]],
    owners: dict[str, tuple[str, torch.nn.Linear, str]],
    sizes: dict[str, int],
    ids: list[list[int]],
    labels: list[list[int]],
    batches: list[list[int]],
    proj: Projector,
    transform: _Transform,
    out: torch.Tensor,
    device: torch.device,
    progress: bool,
) -> None:
    params = [p for _, p in named]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    acc: dict[str, torch.Tensor] = {}
    # Small models (LoRA): gather a batch's per-sample gradients of all parameters into one [B, P] buffer and
    # transform + project it in a few large ops; per parameter, that many small ops cost more in dispatch than
    # in arithmetic. Large ones: transform and project each parameter as its gradient completes (bounded memory).
    fused = max(map(len, batches), default=0) * proj.total * 4 <= FUSED_BUFFER_BYTES
    names = list(proj.sizes)

    def emit(pname: str, grad: torch.Tensor) -> None:
        if fused:
            start = proj.offsets[pname]
            acc["grads"][:, start : start + grad.shape[1]].copy_(grad)
        else:
            proj.project_into(acc["features"], pname, transform(pname, grad), scratch=True)

    with _HookedBatch(owners, sizes, emit) as hooks, torch.enable_grad():
        for rows in tqdm(batches, desc="gradient features", unit="batch", disable=not progress, dynamic_ncols=True):
            hooks.reset()
            acc["features"] = torch.zeros(len(rows), proj.out_dim, device=device)
            if fused:
                acc["grads"] = torch.empty(len(rows), proj.total, device=device)
            input_ids = _pad([ids[i] for i in rows], 0, device)
            lab = _pad([labels[i] for i in rows], IGNORE_INDEX, device)
            # Differentiate w.r.t. the input embeddings: the hooks see every LoRA output gradient, and the
            # batch-summed parameter gradients (which nothing here uses) are never formed.
            if embed is not None:
                with _unsharded(model):
                    embeds = embed(input_ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                loss = (per_token_losses(logits, lab).sum(dim=1) / count_supervised_tokens(lab).clamp(min=1)).sum()
                torch.autograd.grad(loss, embeds)
            else:  # a model without HF's embedding accessor: differentiate w.r.t. the parameters instead
                loss = per_sample_losses(model, input_ids, lab).sum()
                torch.autograd.grad(loss, params, allow_unused=True)
            hooks.flush(len(rows), device)
            if fused:
                proj.project_all_into(acc["features"], transform.all(names, acc.pop("grads")), scratch=True)
            out[torch.tensor(rows)] = acc["features"].to(out.dtype).cpu()


@contextlib.contextmanager
def _unsharded(model: torch.nn.Module) -> Iterator[None]:
    """The root's own parameters (embeddings) gathered while a module of it is called outside its forward: under
    FSDP2 they are shards until the root unshards them; the decoder layers keep their own sharding."""
    from dataflex.distributed.fsdp import is_sharded

    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _loop_features(
    model: torch.nn.Module,
    named: list[tuple[str, torch.nn.Parameter]],
    ids: list[list[int]],
    labels: list[list[int]],
    order: list[int],
    proj: Projector,
    transform: _Transform,
    out: torch.Tensor,
    device: torch.device,
    progress: bool,
) -> None:
    params = [p for _, p in named]
    with torch.enable_grad():
        for i in tqdm(order, desc="gradient features (per-sample loop)", unit="sample", disable=not progress):
            input_ids = _pad([ids[i]], 0, device)
            lab = _pad([labels[i]], IGNORE_INDEX, device)
            grads = torch.autograd.grad(per_sample_losses(model, input_ids, lab).sum(), params, allow_unused=True)
            feat = torch.zeros(1, proj.out_dim, device=device)
            for (name, p), g in zip(named, grads):
                flat = (g if g is not None else torch.zeros_like(p)).reshape(1, -1).float()
                proj.project_into(feat, name, transform(name, flat))
            out[i] = feat[0].to(out.dtype).cpu()
