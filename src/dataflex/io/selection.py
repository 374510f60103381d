"""`SelectionDataset`: a one-shot selection (LESS, static_select) as the files users read, written atomically.

The value is the selection summary with its per-target files attached:
`{"targets": {name: {...}}, ..., "files": {"selections/<t>.json": dict, "selected/<t>.jsonl": str,
"scores.csv": str}}`. Saving writes each file (temp + rename) and `selection.json` (the summary, naming its files)
last, so a selection is never half-written: no `selection.json`, no selection. Loading returns the summary
with `scores_path` (when a score table was written) and the folder.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset

from dataflex.utils.io import atomic_write_json, atomic_write_text


class SelectionDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = PurePosixPath(path)
        self.metadata = metadata

    @property
    def _filepath(self) -> PurePosixPath:  # the file kedro-mlflow logs as the artifact
        return self._path / "selection.json"

    def _save(self, data: dict[str, Any]) -> None:
        files = dict(data.get("files") or {})
        root = Path(self._path)
        for name, content in files.items():
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise ValueError(f"selection file '{name}' must be a relative path inside the selection folder")
            if isinstance(content, str):
                atomic_write_text(root / name, content)
            else:
                atomic_write_json(root / name, content)
        summary = {k: v for k, v in data.items() if k != "files"}
        atomic_write_json(self._filepath, {**summary, "files": sorted(files)})

    def _load(self) -> dict[str, Any]:
        summary = json.loads(Path(self._filepath).read_text())
        extra = {"path": str(self._path)}
        if "scores.csv" in summary.get("files", []):
            extra["scores_path"] = str(Path(self._path) / "scores.csv")
        return {**summary, **extra}

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
