"""Read raw rows of one dataset_info entry: .json / .jsonl / .parquet (and LF's .csv / .txt), file or folder."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from dataflex.core.errors import DataError
from dataflex.data.dataset_info import DatasetAttr
from dataflex.utils.io import read_user_text

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".txt")


def read_rows(attr: DatasetAttr, dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of the dataset as dicts, in file order (folders: files sorted by name)."""
    path = attr.path(dataset_dir)
    if not path.exists():
        what = "is a broken link or a link loop" if path.is_symlink() else "not found"
        raise DataError(
            f"dataset '{attr.name}': file {os.path.abspath(path)} {what}; "
            "fix file_name in dataset_info.json or add the file"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        files = [p for p in files if p.suffix.lower() in SUPPORTED_EXTENSIONS]
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
