"""`dataflex-cli offline-select near|tsds`: the counterpart of DataFlex's offline NEAR / TSDS tools.

Reads the candidates (the pool) and the queries (the target; default: the first 100 candidates, as DataFlex) as
Alpaca JSON / JSONL files, embeds both with a local encoder and writes DataFlex's file into `--output`:

  near  `top_indices.npy`  int64 [queries, K]: each query's pool rows, nearest first (K = min(max_K, pool size))
  tsds  `tsds_probs.npy`   float64 [pool size]: TSDS sampling probabilities (sum 1)

for the `near` selector's `indices_path` / the `tsds` selector's `probs_path`. The embedding, neighbour and TSDS code
is the selectors' own (`dataflex.features`), with their parameter names and defaults.

Texts. With `--tokenizer` (the training model's folder) the files are tokenised as training does (`--template`,
`--cutoff-len`, `--max-samples`) and each row's text is its token ids decoded: the very text the selectors embed, so
the file equals what `near` / `tsds` compute on that pool and target, and its rows are rows of the processed pool
(which drops rows left with no supervised token). Without it each row is DataFlex's text (`Instruction: ...`,
`Input: ...`, `Output: ...`, `Prediction: ...`) and rows are file rows, as with DataFlex's tools.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataflex.core.errors import ConfigError, DataError
from dataflex.utils.logging import logger

METHODS = ("near", "tsds")
OUTPUT_FILES = {"near": "top_indices.npy", "tsds": "tsds_probs.npy"}
DEFAULT_QUERIES = 100  # DataFlex's tools: the first 100 candidates when no query file is given
ALPACA_FIELDS = ("instruction", "input", "output")


def _selector_default(method: str, name: str) -> Any:
    """The `near` / `tsds` selector's default for `name` (the one home of every default used here)."""
    from dataflex.train.selector.embedding_common import signature_default
    from dataflex.train.selector.near_selector import NearSelector
    from dataflex.train.selector.tsds_selector import TsdsSelector

    return signature_default(NearSelector if method == "near" else TsdsSelector, name)


def read_alpaca(paths: Sequence[str | Path], what: str) -> list[dict[str, Any]]:
    """The rows of Alpaca JSON / JSONL files, in order; a missing, empty or malformed file is one DataError line."""
    from dataflex.data.readers import read_file

    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"offline-select: {what} file {path} not found")
        if path.suffix.lower() not in (".json", ".jsonl"):
            raise DataError(f"offline-select: {what} file {path} must be Alpaca .json or .jsonl")
        got = read_file(path, dataset=what)
        if not got:
            raise DataError(f"offline-select: {what} file {path} has no rows")
        for i, row in enumerate(got):
            if not any(row.get(k) for k in ALPACA_FIELDS):
                raise DataError(
                    f"offline-select: {what} file {path}: row {i} has none of {', '.join(ALPACA_FIELDS)}; "
                    "offline-select reads Alpaca rows"
                )
        rows.extend(got)
    return rows


def dataflex_texts(rows: Sequence[dict[str, Any]], text: str = "full") -> list[str]:
    """DataFlex's text of each Alpaca row (`text: prompt` keeps the instruction and input lines only)."""
    out = []
    for r in rows:
        lines = [f"Instruction: {r.get('instruction', '')}", f"Input: {r.get('input', '')}"]
        if text == "full":
            lines += [f"Output: {r.get('output', '')}", f"Prediction:{r.get('prediction', '')}"]
        out.append("\n".join(lines))
    return out


def processed_texts(
    paths: Sequence[str | Path],
    tokenizer: Any,
    *,
    template: str,
    cutoff_len: int,
    max_samples: int | None = None,
    text: str = "full",
) -> list[str]:
    """The files tokenised as training does (each file one domain, in order), each row decoded as the selectors
    decode it."""
    from dataflex.data import build_dataset
    from dataflex.features.embeddings import row_texts

    with tempfile.TemporaryDirectory(prefix="dataflex-offline-select-") as tmp:
        names = [f"file{i}" for i in range(len(paths))]
        info = {n: {"file_name": str(Path(p).resolve()), "formatting": "alpaca"} for n, p in zip(names, paths)}
        (Path(tmp) / "dataset_info.json").write_text(json.dumps(info))
        ds = build_dataset(
            dataset=names,
            dataset_dir=tmp,
            tokenizer=tokenizer,
            template=template,
            cutoff_len=cutoff_len,
            stage="sft",
            max_samples=max_samples,
        )
    return row_texts(ds, tokenizer, text)


def embed_texts(texts: Sequence[str], encoder: str, *, batch_size: int, max_length: int) -> Any:
    """[N, d] normalised embeddings with the selectors' encoder code (the packaged MiniLM or a local folder)."""
    from dataflex.features.embeddings import MODEL_ENCODER, EmbeddingSettings, encode_texts, encoder_path

    if encoder == MODEL_ENCODER:
        raise ConfigError(
            "offline-select has no training model: --embedding-model must be all-MiniLM-L6-v2 or a local "
            "sentence-transformers / Hugging Face model folder"
        )
    settings = EmbeddingSettings(encoder=encoder, batch_size=batch_size, max_length=max_length)
    return encode_texts(texts, encoder_path(settings), batch_size=batch_size, max_length=max_length, progress=True)


def near_indices(pool: Any, queries: Any, *, max_K: int, exact_threshold: int) -> np.ndarray:
    """int64 [queries, min(max_K, N)]: each query's nearest pool rows, nearest first (the `near` selector's search)."""
    from dataflex.features.neighbors import knn

    return knn(pool, queries, max_K, exact_threshold=exact_threshold)[1].astype(np.int64)


def tsds_probs(
    pool: Any,
    queries: Any,
    *,
    alpha: float,
    C: float,
    sigma: float,
    max_K: int,
    kde_K: int,
    exact_threshold: int,
) -> tuple[np.ndarray, dict[str, float]]:
    """(float64 [N] probabilities, summary): the `tsds` selector's computation on these embeddings."""
    from dataflex.features.distribution import tsds_from_neighbors
    from dataflex.features.neighbors import knn

    dist, idx = knn(pool, queries, max_K, exact_threshold=exact_threshold)
    return tsds_from_neighbors(
        pool, dist, idx, alpha=alpha, C=C, sigma=sigma, kde_K=kde_K, exact_threshold=exact_threshold
    )


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def offline_select(
    method: str,
    candidates: Sequence[str | Path],
    output: str | Path,
    *,
    queries: Sequence[str | Path] | None = None,
    embedding_model: str | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    cutoff_len: int | None = None,
    max_samples: int | None = None,
    **params: Any,
) -> Path:
    """Write `top_indices.npy` (near) or `tsds_probs.npy` (tsds) into `output` (atomically) and return its path.

    `params`: the selector's parameters (`text`, `max_length`, `batch_size`, `max_K`, `exact_threshold`; tsds also
    `alpha`, `C`, `sigma`, `kde_K`); missing or None ones take the selector's default."""
    from dataflex.utils.io import atomic_write_bytes

    if method not in METHODS:
        raise ConfigError(f"offline-select method must be one of {', '.join(METHODS)}, got {method!r}")
    keys = ["text", "max_length", "batch_size", "max_K", "exact_threshold"]
    keys += ["alpha", "C", "sigma", "kde_K"] if method == "tsds" else []
    unknown = sorted(set(params) - set(keys))
    if unknown:
        raise ConfigError(f"offline-select {method} does not take {', '.join(unknown)}; accepted: {', '.join(keys)}")
    p = {k: params[k] if params.get(k) is not None else _selector_default(method, k) for k in keys}
    encoder = embedding_model or _selector_default(method, "encoder")
    _check_params(method, p)
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"offline-select: --output {out_dir} is a file, not a folder")

    cand_rows = read_alpaca(candidates, "candidates")
    query_rows = read_alpaca(queries, "queries") if queries else None
    if tokenizer is not None:
        from dataflex.config import DEFAULTS
        from dataflex.models import load_tokenizer

        if not Path(tokenizer).is_dir():
            raise ConfigError(f"offline-select: --tokenizer {tokenizer} is not a local model / tokenizer folder")
        tok = load_tokenizer(str(tokenizer))
        fmt = {
            "template": template or DEFAULTS["data"]["template"],
            "cutoff_len": cutoff_len if cutoff_len is not None else DEFAULTS["data"]["cutoff_len"],
            "max_samples": max_samples,
            "text": p["text"],
        }
        cand_texts = processed_texts(candidates, tok, **fmt)
        query_texts = processed_texts(queries, tok, **fmt) if queries else None
    else:
        if template is not None or cutoff_len is not None or max_samples is not None:
            raise ConfigError("offline-select: --template, --cutoff-len and --max-samples need --tokenizer")
        cand_texts = dataflex_texts(cand_rows, p["text"])
        query_texts = dataflex_texts(query_rows, p["text"]) if query_rows else None
    if query_texts is None:
        logger.info(
            "offline-select: no --queries; the first %d candidates are the queries (as DataFlex)", DEFAULT_QUERIES
        )
        query_texts = cand_texts[:DEFAULT_QUERIES]
    logger.info(
        "offline-select %s: %d candidates, %d queries, encoder %s", method, len(cand_texts), len(query_texts), encoder
    )

    emb = {"batch_size": p["batch_size"], "max_length": p["max_length"]}
    pool = embed_texts(cand_texts, encoder, **emb)
    target = embed_texts(query_texts, encoder, **emb)
    search = {"max_K": p["max_K"], "exact_threshold": p["exact_threshold"]}
    if method == "near":
        arr = near_indices(pool, target, **search)
        summary = f"{arr.shape[0]} queries x {arr.shape[1]} neighbours"
    else:
        arr, info = tsds_probs(pool, target, alpha=p["alpha"], C=p["C"], sigma=p["sigma"], kde_K=p["kde_K"], **search)
        summary = f"support {info['support']} of {len(arr)} rows"
    path = atomic_write_bytes(out_dir / OUTPUT_FILES[method], _npy_bytes(arr))
    logger.info("offline-select %s: %s written to %s", method, summary, path)
    return path


def _check_params(method: str, p: dict[str, Any]) -> None:
    """The selector's own value checks, so a bad option is the same one line as in a components file."""
    from dataflex.features.embeddings import TEXT_MODES
    from dataflex.train.selector.embedding_common import positive_int

    for key in ("max_length", "batch_size", "max_K", "exact_threshold"):
        positive_int(method, key, p[key])
    if p["text"] not in TEXT_MODES:
        raise ConfigError(f"offline-select: --text must be one of {', '.join(TEXT_MODES)}, got {p['text']!r}")
    if method == "tsds":
        from dataflex.train.selector.tsds_selector import TsdsSelector

        TsdsSelector.check_params(p)


def add_parser(subparsers: Any) -> None:
    """Register `offline-select` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "offline-select",
        help="precompute DataFlex's top_indices.npy (near) or tsds_probs.npy (tsds) from Alpaca files",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("method", choices=METHODS, help="near: top_indices.npy; tsds: tsds_probs.npy")
    p.add_argument("--candidates", nargs="+", required=True, metavar="FILE", help="the pool: Alpaca .json/.jsonl")
    p.add_argument(
        "--queries", nargs="+", default=None, metavar="FILE", help="the target (default: the first 100 candidates)"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for top_indices.npy / tsds_probs.npy")
    p.add_argument(
        "--embedding-model",
        default=None,
        metavar="PATH",
        help="all-MiniLM-L6-v2 (packaged) or a local sentence-transformers / HF model folder (default: the "
        "selector's encoder, all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="the training model's folder: tokenise like training, so the file matches the selector on that pool",
    )
    p.add_argument("--template", default=None, help="chat template of the training run (with --tokenizer)")
    p.add_argument("--cutoff-len", dest="cutoff_len", type=int, default=None, help="with --tokenizer")
    p.add_argument("--max-samples", dest="max_samples", type=int, default=None, help="with --tokenizer")
    p.add_argument("--text", default=None, choices=("full", "prompt"), help="embed prompt + response or the prompt")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int, default=None)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    p.add_argument("--max-K", "--max_K", "--top-k", dest="max_K", type=int, default=None, help="neighbours per query")
    p.add_argument("--exact-threshold", "--exact_threshold", dest="exact_threshold", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="tsds: transport vs diversity, in (0, 1)")
    p.add_argument("--C", dest="C", type=float, default=None, help="tsds: > 0")
    p.add_argument("--sigma", type=float, default=None, help="tsds: KDE bandwidth, >= 0 (0 = no density correction)")
    p.add_argument("--kde-K", "--kde_K", dest="kde_K", type=int, default=None, help="tsds: KDE neighbours")
    p.set_defaults(func=cmd_offline_select)


def cmd_offline_select(ns: argparse.Namespace) -> int:
    """Run `offline-select` from parsed arguments; user mistakes raise ConfigError / DataError (exit 2 in the CLI)."""
    params = {k: getattr(ns, k) for k in ("text", "max_length", "batch_size", "max_K", "exact_threshold")}
    if ns.method == "tsds":
        params.update({k: getattr(ns, k) for k in ("alpha", "C", "sigma", "kde_K")})
    else:
        given = [k for k in ("alpha", "C", "sigma", "kde_K") if getattr(ns, k) is not None]
        if given:
            raise ConfigError(f"offline-select near does not take {', '.join('--' + k for k in given)} (tsds only)")
    path = offline_select(
        ns.method,
        ns.candidates,
        ns.output,
        queries=ns.queries,
        embedding_model=ns.embedding_model,
        tokenizer=ns.tokenizer,
        template=ns.template,
        cutoff_len=ns.cutoff_len,
        max_samples=ns.max_samples,
        **params,
    )
    print(f"{ns.method}: wrote {path}")
    return 0
