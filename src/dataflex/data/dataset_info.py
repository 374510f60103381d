"""`dataset_info.json` registry, LLaMA-Factory conventions.

Each entry names a local file (or folder) and how its columns map onto the roles the processing step
needs. Hub / script entries are not supported: nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dataflex.core.errors import ConfigError, DataError
from dataflex.utils.io import read_user_text
from dataflex.utils.logging import logger

DATASET_INFO = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")

# Column and tag defaults exactly as LLaMA-Factory's DatasetAttr.
_COLUMN_DEFAULTS: dict[str, str | None] = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "messages": "conversations",
    "system": None,
    "tools": None,
}
_TAG_DEFAULTS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# Keys LLaMA-Factory accepts in an entry; anything else is probably a typo and is reported.
_KNOWN_KEYS = {
    "file_name",
    "formatting",
    "columns",
    "tags",
    "ranking",
    "split",
    "folder",
    "subset",
    "num_samples",
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "load_from",
}
# Columns LF knows but this project does not use (multimodal, preference): accepted, ignored.
_IGNORED_COLUMNS = {"images", "videos", "audios", "chosen", "rejected", "kto_tag"}


@dataclass(frozen=True)
class DatasetAttr:
    """One `dataset_info.json` entry with LLaMA-Factory defaults filled in."""

    name: str
    file_name: str
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    # alpaca columns (pt text lives in `prompt`, mapped as `columns: {prompt: text}`)
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    # sharegpt columns
    messages: str | None = "conversations"
    # both
    system: str | None = None
    tools: str | None = None
    # sharegpt tags
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"
    # tags that are not role tags (e.g. the demo's domain / split), kept for callers
    extra_tags: dict[str, Any] = field(default_factory=dict)

    def path(self, dataset_dir: str | os.PathLike) -> Path:
        """Absolute path of the file or folder; relative names are relative to `dataset_dir`."""
        p = Path(self.file_name)
        return p if p.is_absolute() else Path(dataset_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_dataset_info(dataset_dir: str | os.PathLike) -> dict[str, DatasetAttr]:
    """Parse `<dataset_dir>/dataset_info.json` into `{name: DatasetAttr}` (file order kept)."""
    path = Path(dataset_dir) / DATASET_INFO
    if not path.is_file():
        raise DataError(
            f"{path} not found: dataset_dir must contain a dataset_info.json "
            "(LLaMA-Factory format); check `dataset_dir` or run the demo data generator"
        )
    try:
        raw = json.loads(read_user_text(path, "dataset_info", DataError))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object mapping dataset names to entries, got {type(raw).__name__}")
    return {name: _parse_entry(name, entry, path) for name, entry in raw.items()}


def _parse_entry(name: str, entry: Any, path: Path) -> DatasetAttr:
    where = f"{path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry must be an object with at least 'file_name', got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        logger.warning("%s: ignoring unknown key(s) %s", where, unknown)
    if not entry.get("file_name"):
        hub = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if entry.get(k)]
        why = f" ({hub[0]} entries are not supported offline)" if hub else ""
        raise DataError(f'{where}: entry has no \'file_name\'{why}; add "file_name": "<file or folder>"')
    if entry.get("num_samples"):
        logger.warning("%s: 'num_samples' (LF resampling) is not supported and is ignored; use max_samples", where)
    if entry.get("ranking"):
        raise DataError(f"{where}: ranking (preference) datasets are not supported; remove 'ranking' or the entry")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: unknown formatting {formatting!r}; use one of {', '.join(FORMATTINGS)}")

    kwargs: dict[str, Any] = {"name": name, "file_name": str(entry["file_name"]), "formatting": formatting}
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: 'columns' and 'tags' must be objects")
    for key, value in columns.items():
        if key in _COLUMN_DEFAULTS:
            kwargs[key] = value
        elif key not in _IGNORED_COLUMNS:
            raise DataError(f"{where}: unknown column role {key!r}; valid roles: {', '.join(_COLUMN_DEFAULTS)}")
    extra = {}
    for key, value in tags.items():
        if key in _TAG_DEFAULTS:
            kwargs[key] = value
        else:
            extra[key] = value
    kwargs["extra_tags"] = extra
    return DatasetAttr(**kwargs)


def parse_dataset_names(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`"a, b,c"` or `["a", "b"]` -> `["a", "b", "c"]`; the order is the domain order."""
    if value is None:
        names: list[str] = []
    elif isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, list | tuple):
        names = []
        for v in value:
            if not isinstance(v, str):
                raise ConfigError(f"dataset: expected names (strings), got {v!r}; write dataset: a,b or a YAML list")
            names.extend(n.strip() for n in v.split(","))
    else:
        raise ConfigError(f"dataset: expected a comma-separated string or a list, got {type(value).__name__}")
    names = [n for n in names if n]
    if not names:
        raise ConfigError("dataset is empty: name at least one entry of dataset_info.json, e.g. dataset: arith_train")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        # A repeated name would silently collapse into one domain (LF does this): refuse instead.
        raise ConfigError(f"dataset lists {', '.join(dup)} more than once; each domain must appear once")
    return names


def resolve_datasets(
    names: str | list[str] | tuple[str, ...] | None, dataset_dir: str | os.PathLike
) -> list[DatasetAttr]:
    """Look up each name in `dataset_dir/dataset_info.json`, in the given (domain) order."""
    names = parse_dataset_names(names)
    info = load_dataset_info(dataset_dir)
    out = []
    for n in names:
        if n not in info:
            known = list(info)
            shown = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
            raise DataError(
                f"dataset {n!r} is not in {Path(dataset_dir) / DATASET_INFO}; known: {shown or '(none)'}; "
                "fix the name or add an entry"
            )
        out.append(info[n])
    return out
