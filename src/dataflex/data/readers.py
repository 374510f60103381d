"""Read raw rows of one dataset_info entry: .json / .jsonl / .parquet (and LF's .csv / .txt), file or folder, or a
hub / script entry through `datasets.load_dataset` (ModelScope's MsDataset for ms_hub_url), then LF's
`num_samples` resampling."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from dataflex.core.errors import DataError, DataFlexError
from dataflex.data.dataset_info import DATASET_INFO, DatasetAttr
from dataflex.utils.io import read_user_text, sha256_file, sha256_json

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".txt")
_TRUE = {"1", "true", "yes", "on"}
# Exception class names (anywhere in the chain) that mean "the network is not there", from requests, httpx,
# huggingface_hub and the standard library, matched by name so none of them has to be imported.
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "NewConnectionError",
    "NameResolutionError",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "TimeoutError",
    "Timeout",
    "ReadTimeout",
    "TimeoutException",
    "NetworkError",
    "gaierror",
}


def read_rows(attr: DatasetAttr, dataset_dir: str | os.PathLike, *, seed: int = 0) -> list[dict[str, Any]]:
    """All rows of the dataset as dicts, in file order (folders: files sorted by name); with `num_samples`, LF's
    resampling of them (seeded by `seed`: every caller must pass the same one to see the same rows)."""
    rows = _read_local(attr, dataset_dir) if attr.is_local else _read_remote(attr, dataset_dir)
    if attr.num_samples is not None and rows:
        rows = sample_rows(rows, attr.num_samples, seed)
    return rows


def sample_rows(rows: list[dict[str, Any]], num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """LLaMA-Factory's `num_samples` (`_load_single_dataset`): a random permutation cut to `num_samples`; when that
    is more than there are rows, every row once and then rows drawn with replacement for the rest."""
    rng = np.random.RandomState(seed)  # LF draws from numpy's global state seeded by the run seed
    indexes = rng.permutation(len(rows))[:num_samples]
    if num_samples > len(indexes):
        indexes = np.concatenate((indexes, rng.choice(len(rows), num_samples - len(indexes))))
    return [rows[i] for i in indexes.tolist()]


def source_hashes(attr: DatasetAttr, dataset_dir: str | os.PathLike) -> list[list[str]]:
    """What a cache fingerprint should hash for this entry: `[name, sha256]` of each local file, or for a hub /
    script entry its source and the `datasets` fingerprint of the loaded split (content-derived, cached)."""
    if attr.is_local:
        path = attr.path(dataset_dir)
        if path.is_file():
            return [[path.name, sha256_file(path)]]
        if path.is_dir():
            return [[p.name, sha256_file(p)] for p in _folder_files(path)]
        _missing(attr, path)
    ds = _load_remote(attr, dataset_dir)
    fingerprint = getattr(ds, "_fingerprint", None) or sha256_json(ds.to_list())
    return [[attr.describe(), str(fingerprint)]]


def _folder_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in SUPPORTED_EXTENSIONS]


def _missing(attr: DatasetAttr, path: Path) -> NoReturn:
    what = "is a broken link or a link loop" if path.is_symlink() else "not found"
    raise DataError(
        f"dataset '{attr.name}': file {os.path.abspath(path)} {what}; "
        "fix file_name in dataset_info.json or add the file"
    )


def _read_local(attr: DatasetAttr, dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = attr.path(dataset_dir)
    if not path.exists():
        _missing(attr, path)
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(
                f"dataset '{attr.name}': folder {path.resolve()} has no {'/'.join(SUPPORTED_EXTENSIONS)} files"
            )
    else:
        files = [path]
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(read_file(f, dataset=attr.name))
    return rows


# ----------------------------------------------------------------------------- hub / script entries
def _offline_env() -> str | None:
    """The offline variable that is set, read now (not at import) so a run or a test can set it late."""
    return next(
        (k for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(k, "").strip().lower() in _TRUE), None
    )


def _network_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, ConnectionError | TimeoutError) or any(c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0][:200] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_remote(attr: DatasetAttr, dataset_dir: str | os.PathLike) -> Any:
    """The entry's split as a `datasets.Dataset`; every failure is one DataError line naming the entry."""
    where = f"{Path(dataset_dir) / DATASET_INFO}: dataset '{attr.name}'"
    source = str(attr.source)
    remote = True
    if attr.load_from == "ms_hub":
        try:
            from modelscope import MsDataset  # type: ignore[import-not-found]
        except ImportError:
            raise DataError(
                f"{where}: ms_hub_url {source!r} needs the modelscope package; pip install modelscope, "
                "or use hf_hub_url"
            ) from None

        def load() -> Any:
            ds = MsDataset.load(dataset_name=source, subset_name=attr.subset, data_dir=attr.folder, split=attr.split)
            return ds.to_hf_dataset() if isinstance(ds, MsDataset) else ds
    else:
        import datasets

        path = source
        if attr.load_from == "script":
            # LF: a script or folder under dataset_dir (absolute paths stay as they are); else a hub id.
            local = Path(dataset_dir) / source
            if local.exists():
                path, remote = str(local), False

        def load() -> Any:
            return datasets.load_dataset(path, name=attr.subset, data_dir=attr.folder, split=attr.split)

    try:
        ds = load()
    except DataFlexError:
        raise
    except Exception as e:  # datasets / hub / modelscope raise many types; each becomes one line
        offline = _offline_env() if remote else None
        if offline or _network_error(e):
            why = f"offline mode: {offline} is set" if offline else f"no network: {_reason(e)}"
            raise DataError(
                f"{where}: {attr.describe()} needs network ({why}); load it once online so it is cached, "
                'or download it and add a local "file_name" to the entry'
            ) from None
        raise DataError(
            f'{where}: cannot load {attr.describe()} ({_reason(e)}); fix the entry or use a local "file_name"'
        ) from None
    if not hasattr(ds, "to_list"):
        raise DataError(
            f"{where}: {attr.describe()} did not load as one split (got {type(ds).__name__}); set 'split' in the entry"
        )
    return ds


def _read_remote(attr: DatasetAttr, dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return _load_remote(attr, dataset_dir).to_list()


# ----------------------------------------------------------------------------- local files
def read_file(path: str | os.PathLike, *, dataset: str = "?") -> list[dict[str, Any]]:
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".json":
        return _read_json(path, dataset)
    if ext == ".jsonl":
        return _read_jsonl(path, dataset)
    if ext == ".parquet":
        return _read_parquet(path, dataset)
    if ext == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(_text(path, dataset), newline=""))]
    if ext == ".txt":
        # LF / HF "text" loader: one row per line, column `text`.
        return [{"text": line} for line in _text(path, dataset).splitlines() if line.strip()]
    raise DataError(
        f"dataset '{dataset}': unsupported file type {path.name!r}; use one of {', '.join(SUPPORTED_EXTENSIONS)}"
    )


def _text(path: Path, dataset: str) -> str:
    return read_user_text(path, f"dataset '{dataset}': file", DataError)


def _read_json(path: Path, dataset: str) -> list[dict[str, Any]]:
    text = _text(path, dataset)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Several top-level values: JSON lines saved as .json (the HF loader accepts this too).
            return _parse_jsonl(text, path, dataset)
        raise DataError(
            f"dataset '{dataset}': {path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file"
        ) from None
    if isinstance(data, dict):
        # {"data": [...]}-style wrappers: accept a single list-valued key, like HF's `field`.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) != 1 or len(lists) != 1:
            raise DataError(
                f"dataset '{dataset}': {path}: expected a JSON list of objects, got an object with keys "
                f"{sorted(data)[:5]}; write the rows as [{{...}}, {{...}}]"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"dataset '{dataset}': {path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(
                f"dataset '{dataset}': {path}: item {i} is a {type(row).__name__}, expected an object "
                '(a list of {"instruction": ..., "output": ...} rows)'
            )
    return data


def _read_jsonl(path: Path, dataset: str) -> list[dict[str, Any]]:
    return _parse_jsonl(_text(path, dataset), path, dataset)


def _parse_jsonl(text: str, path: Path, dataset: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"dataset '{dataset}': {path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"dataset '{dataset}': {path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_parquet(path: Path, dataset: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"dataset '{dataset}': {path}: cannot read parquet ({e}); re-export the file") from None
