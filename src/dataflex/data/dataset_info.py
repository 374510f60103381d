"""`dataset_info.json` registry, LLaMA-Factory conventions.

Each entry names a local file (or folder), a hub dataset (`hf_hub_url`, `ms_hub_url`) or a `script_url`, and how
its columns map onto the roles the processing step needs. Like LLaMA-Factory, only the entries a run names are
parsed: a hub, ranking or otherwise unusable entry the run never names is never looked at.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dataflex.core.errors import ConfigError, DataError
from dataflex.utils.io import read_user_text
from dataflex.utils.logging import logger

DATASET_INFO = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
# The entry key each non-file source comes from (for messages).
SOURCE_KEYS = {"hf_hub": "hf_hub_url", "ms_hub": "ms_hub_url", "script": "script_url"}

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
    "file_sha1",  # older LLaMA-Factory files carry it; never checked there either
}
# Multimodal columns LF knows but this project does not use: accepted, ignored.
_IGNORED_COLUMNS = {"images", "videos", "audios"}
# Preference columns: the entry is for LF's preference stages, which this project does not train.
_PAIRWISE_COLUMNS = ("chosen", "rejected")
_STAGES_HINT = "this project trains sft and pt only; drop it from dataset / eval_dataset or use an sft dataset"
_TRUE = {"1", "true", "yes", "on"}

LoadFrom = Literal["file", "hf_hub", "ms_hub", "script"]


@dataclass(frozen=True)
class DatasetAttr:
    """One `dataset_info.json` entry with LLaMA-Factory defaults filled in."""

    name: str
    file_name: str | None = None
    # where the rows come from: a local file/folder, or `source` loaded through `datasets` / ModelScope
    load_from: LoadFrom = "file"
    source: str | None = None  # hub id (hf_hub / ms_hub) or script_url (a path under dataset_dir, or a hub id)
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None  # LF resampling: this many rows, drawn without then with replacement
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

    @property
    def is_local(self) -> bool:
        """True for a `file_name` entry (read by dataflex's own readers, no network)."""
        return self.load_from == "file"

    def path(self, dataset_dir: str | os.PathLike) -> Path:
        """Absolute path of the file or folder; relative names are relative to `dataset_dir`."""
        if not self.is_local or not self.file_name:
            raise DataError(f"dataset '{self.name}' is loaded from {self.describe()}, it has no local file")
        p = Path(self.file_name)
        return p if p.is_absolute() else Path(dataset_dir) / p

    def describe(self) -> str:
        """`hf_hub_url 'org/name' (subset 'en', split 'train')` or `file_name 'a.json'`, for messages."""
        if self.is_local:
            return f"file_name {self.file_name!r}"
        parts = [f"subset {self.subset!r}"] if self.subset else []
        parts += [f"folder {self.folder!r}"] if self.folder else []
        parts.append(f"split {self.split!r}")
        return f"{SOURCE_KEYS[self.load_from]} {self.source!r} ({', '.join(parts)})"

    def location(self, dataset_dir: str | os.PathLike) -> str:
        """Where the rows come from, for messages: the local path, or the hub source."""
        return str(self.path(dataset_dir)) if self.is_local else self.describe()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DatasetInfo(Mapping[str, DatasetAttr]):
    """The entries of one `dataset_info.json`, in file order, each parsed and checked on first use only:
    LLaMA-Factory reads just the entries a run names, so an entry nobody uses never stops a run."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self._raw = raw
        self._parsed: dict[str, DatasetAttr] = {}

    def __getitem__(self, name: str) -> DatasetAttr:
        if name not in self._parsed:
            self._parsed[name] = _parse_entry(name, self._raw[name], self.path)
        return self._parsed[name]

    def __contains__(self, name: object) -> bool:
        return name in self._raw  # without parsing: Mapping's default would parse the entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


def load_dataset_info(dataset_dir: str | os.PathLike) -> DatasetInfo:
    """`<dataset_dir>/dataset_info.json` as `{name: DatasetAttr}` (file order kept). The file must be a JSON
    object; each entry is parsed and checked when first looked up."""
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
    return DatasetInfo(path, raw)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _check_stage(where: str, entry: dict[str, Any], columns: dict[str, Any]) -> None:
    """Preference / feedback entries belong to LF stages this project does not have: refuse them by name."""
    if entry.get("ranking") or any(c in columns for c in _PAIRWISE_COLUMNS):
        raise DataError(f"{where}: a ranking (preference) dataset, for LLaMA-Factory's rm / dpo stages; {_STAGES_HINT}")
    if "kto_tag" in columns:
        raise DataError(f"{where}: a kto (feedback) dataset, for LLaMA-Factory's kto stage; {_STAGES_HINT}")


def _source(where: str, entry: dict[str, Any]) -> dict[str, Any]:
    """`load_from` / `file_name` / `source` of an entry. A local `file_name` wins over hub URLs (LF prefers the
    hub): a run with a local copy stays offline and reproducible. Among hubs, LF's choice (ms_hub only when
    USE_MODELSCOPE_HUB is set or there is no hf_hub_url)."""
    if entry.get("file_name"):
        return {"load_from": "file", "file_name": str(entry["file_name"])}
    has_hf, has_ms, has_om = (bool(entry.get(k)) for k in ("hf_hub_url", "ms_hub_url", "om_hub_url"))
    if has_ms and (_env_flag("USE_MODELSCOPE_HUB") or not has_hf):
        return {"load_from": "ms_hub", "source": str(entry["ms_hub_url"])}
    if has_om and (_env_flag("USE_OPENMIND_HUB") or not has_hf):
        raise DataError(f'{where}: om_hub_url (openMind) entries are not supported; add hf_hub_url or "file_name"')
    if has_hf:
        return {"load_from": "hf_hub", "source": str(entry["hf_hub_url"])}
    if entry.get("script_url"):
        return {"load_from": "script", "source": str(entry["script_url"])}
    if entry.get("cloud_file_name"):
        raise DataError(f'{where}: cloud_file_name entries are not supported; download the file, set "file_name"')
    raise DataError(
        f"{where}: entry has no 'file_name' (nor hf_hub_url, ms_hub_url or script_url); "
        'add "file_name": "<file or folder>"'
    )


def _optional_str(where: str, entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value or None


def _parse_entry(name: str, entry: Any, path: Path) -> DatasetAttr:
    where = f"{path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry must be an object with at least 'file_name', got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        logger.warning("%s: ignoring unknown key(s) %s", where, unknown)
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: 'columns' and 'tags' must be objects")
    _check_stage(where, entry, columns)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: unknown formatting {formatting!r}; use one of {', '.join(FORMATTINGS)}")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise DataError(f"{where}: 'num_samples' must be an integer >= 1, got {num_samples!r}")

    kwargs: dict[str, Any] = {
        "name": name,
        **_source(where, entry),
        "subset": _optional_str(where, entry, "subset"),
        "split": _optional_str(where, entry, "split") or "train",
        "folder": _optional_str(where, entry, "folder"),
        "num_samples": num_samples,
        "formatting": formatting,
    }
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


def parse_dataset_names(value: str | list[str] | tuple[str, ...] | None, key: str = "dataset") -> list[str]:
    """`"a, b,c"` or `["a", "b"]` -> `["a", "b", "c"]`; the order is the domain order. `key` names the setting
    in messages (`dataset`, `eval_dataset`); a name may appear once in each."""
    if value is None:
        names: list[str] = []
    elif isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, list | tuple):
        names = []
        for v in value:
            if not isinstance(v, str):
                raise ConfigError(f"{key}: expected names (strings), got {v!r}; write {key}: a,b or a YAML list")
            names.extend(n.strip() for n in v.split(","))
    else:
        raise ConfigError(f"{key}: expected a comma-separated string or a list, got {type(value).__name__}")
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"{key} is empty: name at least one entry of dataset_info.json, e.g. {key}: arith_train")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        # A repeated name would silently collapse into one domain (LF does this): refuse instead.
        what = "each domain must appear once" if key == "dataset" else "each eval set must appear once"
        raise ConfigError(f"{key} lists {', '.join(dup)} more than once; {what}")
    return names


def resolve_datasets(
    names: str | list[str] | tuple[str, ...] | None, dataset_dir: str | os.PathLike, key: str = "dataset"
) -> list[DatasetAttr]:
    """Look up each name in `dataset_dir/dataset_info.json`, in the given (domain) order. Only these entries are
    parsed and checked; `key` names the setting in messages."""
    names = parse_dataset_names(names, key)
    info = load_dataset_info(dataset_dir)
    out = []
    for n in names:
        if n not in info:
            known = list(info)
            shown = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
            raise DataError(
                f"dataset {n!r} is not in {info.path}; known: {shown or '(none)'}; fix the name or add an entry"
            )
        out.append(info[n])
    return out
