"""Load, wrap (LoRA / full), save, fingerprint and merge causal LMs.

peft and the transformers model classes are imported inside the functions: importing peft alone takes
seconds, and most of the project (config checks, data pipelines) never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from dataflex.core.errors import CheckpointError, ConfigError
from dataflex.utils.io import atomic_dir, sha256_file
from dataflex.utils.logging import logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FINETUNING_TYPES = ("lora", "full")

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# `org/name` or a bare legacy name (`gpt2`): what the Hub accepts as a model id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

_TRUE = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------------- paths / hub
def is_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import, so tests can patch it)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name


def check_lora_target(model_name_or_path: str, lora_target: str | list[str]) -> None:
    """`lora_target` names linear layers of this architecture: checked on a weightless (meta-device) copy built
    from the model's config.json, before anything is loaded or written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _resolve_lora_targets(skeleton, lora_target)


def check_safetensors(path: Path) -> None:
    """A safetensors file is complete: its header parses and the file holds every tensor it lists (reads the
    header only, not the weights)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else None
    except (OSError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise ConfigError(f"weights file {path} is not a valid safetensors file (truncated or corrupt); re-download it")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + size + end:
        raise ConfigError(
            f"weights file {path} is truncated ({path.stat().st_size} bytes, its header lists {8 + size + end}); "
            "re-download or re-export the model"
        )


def check_model_path(model_name_or_path: str, *, cache_dir: str | None = None) -> None:
    """Fail early, in one line, on a model reference that cannot load: missing dir, dir without config.json,
    or a hub id that is not cached while offline. Online hub ids are left to transformers (no network here)."""
    name = os.fspath(model_name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model path {name!r} is a file: point model_name_or_path to a model directory")
        if not (path / "config.json").is_file():
            hint = (
                " (it is a LoRA adapter: pass it as adapter_path with its base model, or merge_and_export it)"
                if (path / "adapter_config.json").is_file()
                else ""
            )
            raise ConfigError(f"model directory {name!r} has no config.json{hint}: point to a Hugging Face model dir")
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return
    if not _looks_like_hub_id(name):
        raise ConfigError(
            f"model path {name!r} does not exist: fix model_name_or_path (a local directory or a hub id like org/name)"
        )
    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
        cached = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
        if not isinstance(cached, str):
            raise ConfigError(
                f"model {name!r} is not a local directory and not in the Hugging Face cache, and offline mode is on "
                f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE): download it first or use a local model directory"
            )


# ---------------------------------------------------------------------------------------------------- dtype
def _parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """Name -> torch.dtype; 'auto' and None pass through as such. Unknown names raise ConfigError."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use one of fp32, bf16, fp16 (or float32, bfloat16, float16, auto)")
    return _DTYPES[key]


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype to load weights in on `device`.

    - None -> fp32 (safe default for training).
    - "auto" -> bf16 on a CUDA device that supports it, else fp32.
    - fp16 on CPU -> fp32, with a warning: half-precision kernels on CPU are missing or very slow, and pure fp16
      training without a grad scaler diverges.
    - bf16 on CPU is allowed (works, but usually slower than fp32 and less precise): an info note is logged.
    """
    device = torch.device(device)
    dtype = _parse_dtype(name)
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("dtype fp16 is not supported for training on CPU: using fp32 instead")
        return torch.float32
    if device.type == "cpu" and dtype == torch.bfloat16:
        logger.info("dtype bf16 on CPU: supported, but usually slower than fp32 and less precise")
    return dtype


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"invalid device {device!r} ({e}): use cpu, cuda, cuda:0, mps or auto") from None


# ---------------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """AutoTokenizer with a pad token (eos when the tokenizer has none) and right padding (causal LM training)."""
    from transformers import AutoTokenizer

    name = os.fspath(path)
    if not Path(name).expanduser().is_dir():
        check_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=is_offline())
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {name!r} has neither a pad nor an eos token: add a pad_token to it")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------------------------------------------- LoRA targets
def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_linear_target_modules(model: nn.Module) -> list[str]:
    """Suffix names (q_proj, ..., down_proj) of every nn.Linear except the output head, in model order."""
    base = _unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    names: dict[str, None] = {}  # ordered set
    for full_name, module in base.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        parts = full_name.split(".")
        # On a PeftModel the original Linear is `<name>.base_layer`; LoRA's own A/B linears are not targets.
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        if not parts or parts[-1] == "lm_head" or any(p.startswith("lora_") for p in parts):
            continue
        names[parts[-1]] = None
    return list(names)


def _resolve_lora_targets(model: nn.Module, lora_target: str | list[str]) -> list[str]:
    available = find_linear_target_modules(model)
    if isinstance(lora_target, str):
        requested = [t.strip() for t in lora_target.split(",") if t.strip()]
    else:
        requested = [str(t).strip() for t in lora_target]
    if not requested:
        raise ConfigError(f"lora_target is empty: use 'all' or a comma list of {', '.join(available)}")
    if requested == ["all"]:
        # Routers are never adapted unless named: LoRA on a gate changes which experts see which tokens.
        only_in_routers = _router_linear_names(model)
        return [a for a in available if a not in only_in_routers]
    unknown = [t for t in requested if t not in available]
    if unknown:
        raise ConfigError(
            f"lora_target {', '.join(unknown)} matches no linear layer of this model: use 'all' or some of "
            f"{', '.join(available)}"
        )
    return requested


# ---------------------------------------------------------------------------------------------------- MoE routers
# Router classes of models that do not declare one for `router_logits`: LLaMA-MoE's TopKBalancedNoisyGate,
# JetMoE's TopKGating, HunYuan's Gate, ... (matched on the class name, never on a parameter name: a dense MLP's
# `gate_proj` and Mixtral's fused `experts.gate_up_proj` are not routers).
_ROUTER_CLASS = re.compile(r"(Router|Gate|Gating)$")
# Config keys holding how many experts each token is routed to, in the order models use them.
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "num_selected_experts", "top_k")


def _recorded_router_classes(model: nn.Module) -> tuple[type, ...]:
    """The module classes whose output a transformers model records as `router_logits`."""
    classes = []
    for module in model.modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(spec, "target_class", spec)
        if isinstance(target, type):
            classes.append(target)
    return tuple(dict.fromkeys(classes))


def find_router_modules(model: nn.Module) -> list[str]:
    """Module names (on the transformers model inside a PeftModel) of the MoE routers / gates, outermost only."""
    base = _unwrap(model)
    recorded = _recorded_router_classes(base)
    names: list[str] = []
    for name, module in base.named_modules():
        if not name or any(name.startswith(f"{r}.") for r in names):
            continue
        if (recorded and isinstance(module, recorded)) or _ROUTER_CLASS.search(type(module).__name__):
            names.append(name)
    return names


def _router_linear_names(model: nn.Module) -> set[str]:
    """Suffix names of linear layers that exist only inside routers (what `lora_target: all` leaves out)."""
    routers = find_router_modules(model)
    inside: set[str] = set()
    outside: set[str] = set()
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, nn.Linear):
            in_router = any(name == r or name.startswith(f"{r}.") for r in routers)
            (inside if in_router else outside).add(name.split(".")[-1])
    return inside - outside


def router_top_k(config: object) -> int | None:
    """Experts per token of an MoE config (its text config for multimodal ones); None when it names none."""
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _TOP_K_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
    return None


def exposes_router_logits(model: nn.Module) -> bool:
    """The model returns each MoE layer's router logits when called with `output_router_logits=True`."""
    return bool(_recorded_router_classes(_unwrap(model)))


def check_router(model_name_or_path: str, why: str, *, needs_loads: bool = False) -> None:
    """`why` (freeze_gate, a mixer) needs a mixture-of-experts model: checked on a weightless (meta-device) copy
    built from config.json, before anything is loaded. `needs_loads`: the router's expert loads must be readable
    (router_logits with a known top-k)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, local_files_only=is_offline())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001  # any failure to build the architecture is this path's config problem
        raise ConfigError(
            f"{why}: cannot build the model of {model_name_or_path!r}: {' '.join(str(exc).split())}"
        ) from None
    arch = type(skeleton).__name__
    if not find_router_modules(skeleton):
        raise ConfigError(
            f"{why} needs a mixture-of-experts model with a router (gate); {model_name_or_path} ({arch}) has none"
        )
    if needs_loads and exposes_router_logits(skeleton) and router_top_k(config) is None:
        raise ConfigError(
            f"{why}: {arch} returns router_logits but its config names no experts-per-token "
            f"({', '.join(_TOP_K_KEYS)}), so its top-k routing cannot be counted"
        )


def freeze_routers(model: nn.Module, names: list[str]) -> int:
    """requires_grad=False on every parameter of the named router modules (their LoRA layers too, when a
    lora_target named a router's linear); the number of parameters frozen."""
    base = _unwrap(model)
    count = 0
    for name in names:
        for p in base.get_submodule(name).parameters():
            p.requires_grad_(False)
            count += p.numel()
    return count


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the RNG for the block only (peft draws LoRA A from the global RNG); no-op when seed is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _count_params(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------------- load
def load_model(
    model_name_or_path: str,
    *,
    finetuning_type: str = "lora",
    lora_target: str | list[str] = "all",
    lora_rank: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    dtype: str | None = "fp32",
    device: str | None = None,
    adapter_path: str | None = None,
    is_trainable: bool = True,
    seed: int | None = None,
    from_scratch: bool = False,
    freeze_gate: bool = False,
) -> nn.Module:
    """Load a causal LM and prepare it for `finetuning_type`; `from_scratch` builds the architecture of its
    config.json with a random init seeded by `seed` (LLaMA-Factory's train_from_scratch: pre-training).

    - "lora": wrap with a fresh LoRA adapter (alpha defaults to 2*rank, as in LLaMA-Factory), or load
      `adapter_path` (trainable when is_trainable). Only adapter weights require grad.
    - "full": every parameter requires grad (when is_trainable).
    - `freeze_gate` (MoE models): the routers' parameters never require grad, in either mode; ConfigError when the
      model has no router.
    The model is loaded and wrapped on CPU, then moved to `device` (default: cuda if available): LoRA init with a
    given `seed` is thus identical on every device, and the global RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    if finetuning_type not in FINETUNING_TYPES:
        raise ConfigError(f"unknown finetuning_type {finetuning_type!r}: use one of {', '.join(FINETUNING_TYPES)}")
    if finetuning_type == "lora":
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ConfigError(f"lora_rank must be an integer >= 1, got {lora_rank!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    elif adapter_path is not None:
        raise ConfigError("adapter_path is only valid with finetuning_type: lora (merge the adapter for full tuning)")
    if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").is_file():
        raise ConfigError(f"adapter_path {adapter_path!r} has no adapter_config.json: point it to a saved LoRA adapter")

    name = os.fspath(model_name_or_path)
    check_model_path(name)
    dev = _default_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if from_scratch:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, local_files_only=is_offline())
        with torch.random.fork_rng(devices=[]):  # the init is a function of the seed alone; the global RNG is kept
            torch.manual_seed(0 if seed is None else seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, local_files_only=is_offline())

    routers = find_router_modules(model) if freeze_gate else []
    if freeze_gate and not routers:
        raise ConfigError(
            f"freeze_gate needs a mixture-of-experts model with a router (gate); {name} ({type(model).__name__}) "
            "has none: remove freeze_gate or use an MoE model"
        )
    if finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(is_trainable)
    else:
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model

        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, os.fspath(adapter_path), is_trainable=is_trainable)
        else:
            targets = _resolve_lora_targets(model, lora_target)
            config = LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
                lora_dropout=float(lora_dropout),
                target_modules=targets,
            )
            with _seeded(seed):
                model = get_peft_model(model, config)
            if not is_trainable:
                for p in model.parameters():
                    p.requires_grad_(False)

    if routers:
        frozen = freeze_routers(model, routers)
        logger.info("freeze_gate: %d router parameters in %d modules stay frozen", frozen, len(routers))
    model.to(dev)
    model.train(is_trainable)
    trainable, total = _count_params(model)
    logger.info(
        "loaded %s (%s%s) on %s %s: %d / %d params trainable (%.2f%%)",
        name,
        finetuning_type,
        f", adapter {adapter_path}" if adapter_path else "",
        dev,
        str(torch_dtype).removeprefix("torch."),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return model


# ---------------------------------------------------------------------------------------------------- save / merge
def save_trained(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    template: str | None = None,
) -> Path:
    """Atomically save a trained model: the LoRA adapter only (peft format, safetensors) for a peft model,
    the whole model otherwise; plus the tokenizer when given, whose chat template is then the training `template`'s
    (see `set_chat_template`), so the saved folder and what `merge_and_export` makes of it prompt as training did.
    Returns the directory."""
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"cannot save a {type(model).__name__}: expected a transformers or peft model")
    with atomic_dir(output_dir) as tmp:
        # PeftModel.save_pretrained writes only adapter_config.json + adapter_model.safetensors; `state_dict`: the
        # full tensors of a sharded (FSDP2) model, gathered by the caller.
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            original = getattr(tokenizer, "chat_template", None)
            if template is not None:
                set_chat_template(tokenizer, template)
            try:
                tokenizer.save_pretrained(tmp)
            finally:
                tokenizer.chat_template = original  # the caller's tokenizer is left as it was
    return Path(output_dir)


def set_chat_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """Give `tokenizer` the chat template of dataflex's `template`, so `apply_chat_template` gives the token ids
    training's rendering gave. The `tokenizer` template keeps the tokenizer's own (training used it); a template
    with no chat-template form leaves none, with a note (a base model's template would be a wrong one)."""
    from dataflex.data.templates import get_template

    tpl = get_template(template)
    if tpl.use_tokenizer_template:
        return
    jinja = tpl.to_jinja()
    if jinja is None:
        logger.info(
            "template %r has no chat-template form: the saved tokenizer carries no chat template (render prompts with "
            "dataflex.data.templates.get_template(%r).encode_prompt)",
            template,
            template,
        )
    tokenizer.chat_template = jinja


def merge_and_export(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    template: str | None = None,
) -> Path:
    """Merge a LoRA adapter into its base model and save a plain HF model + tokenizer (like `llamafactory-cli export`),
    as safetensors shards of at most `max_shard_size`. The tokenizer's chat template is `template`'s when given,
    else the one the run saved next to its adapter (its training template).

    The merge runs on CPU in fp32 (exact), then weights are cast to `dtype` (None/auto: the base config's dtype,
    else fp32) before saving. The base defaults to adapter_config.json's base_model_name_or_path.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{adapter_dir} has no adapter_config.json: point adapter_dir to a saved LoRA adapter")
    base = base_model or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{cfg_file} names no base_model_name_or_path: pass base_model explicitly")
    check_model_path(base)

    out_dtype = _parse_dtype(dtype)  # export is not training: fp16 is a valid target even from CPU
    offline = is_offline()
    if out_dtype in (None, "auto"):
        # Keep the base checkpoint's own dtype (read before loading: loading in fp32 rewrites config.dtype).
        cfg_dtype = getattr(AutoConfig.from_pretrained(base, local_files_only=offline), "dtype", None)
        if not isinstance(cfg_dtype, torch.dtype):
            cfg_dtype = _DTYPES.get(str(cfg_dtype).removeprefix("torch."), torch.float32)
        out_dtype = cfg_dtype
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=offline)
    merged = PeftModel.from_pretrained(model, os.fspath(adapter_dir)).merge_and_unload()
    merged.to(out_dtype)

    # Prefer the tokenizer saved next to the adapter (it may have been extended), else the base one.
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    tokenizer = load_tokenizer(tok_src)
    if template is not None:
        set_chat_template(tokenizer, template)
    elif tok_src == base:
        logger.info(
            "export: no tokenizer next to the adapter; the base model's chat template is kept (--template sets it)"
        )
    with atomic_dir(output_dir) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    logger.info("merged adapter %s into %s -> %s (%s)", adapter_dir, base, output_dir, out_dtype)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------- fingerprint
_FINGERPRINT_FILES = ("config.json", "adapter_config.json")
_fingerprint_cache: dict[tuple, str] = {}


def model_fingerprint(model_name_or_path: str) -> str:
    """Content hash of a local model dir (config.json + weight files), or `hub:<id>` for a hub model. For cache keys.

    Hashes are memoised on (path, names, sizes, mtimes), so repeated calls do not re-read multi-GB weights.
    """
    name = os.fspath(model_name_or_path)
    path = Path(name).expanduser()
    if not path.is_dir():
        if path.exists() or not _looks_like_hub_id(name):
            raise ConfigError(f"model path {name!r} is not a model directory: fix model_name_or_path")
        return f"hub:{name}"
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    files = [path / f for f in _FINGERPRINT_FILES if (path / f).is_file()] + files
    if not files:
        raise ConfigError(f"model directory {name!r} has no config.json or weight files: point to a model directory")
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(path.resolve()), stats)
    if key not in _fingerprint_cache:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        _fingerprint_cache[key] = h.hexdigest()
    return _fingerprint_cache[key]


# ---------------------------------------------------------------------------------------------------- checkpoints
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that require grad (what a resumable checkpoint must store)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; CheckpointError on any name or shape mismatch."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fix = "resume with the same model and finetuning settings, or start from scratch"
    missing = [n for n in params if n not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint lacks trainable parameter {missing[0]!r} ({len(missing)} missing): "
            f"it is from another model or setup; {fix}"
        )
    unexpected = [n for n in state if n not in params]
    if unexpected:
        raise CheckpointError(
            f"checkpoint has unexpected parameter {unexpected[0]!r} ({len(unexpected)} unexpected): "
            f"it is from another model or setup; {fix}"
        )
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise CheckpointError(
                f"checkpoint parameter {n!r} has shape {tuple(state[n].shape)}, model expects {tuple(p.shape)}: {fix}"
            )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
