"""`JSONLinesDataset`: a list of JSON objects, one per line, written atomically (temp file + rename)."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset

from dataflex.utils.io import atomic_write_text


class JSONLinesDataset(AbstractDataset[list[dict[str, Any]], list[dict[str, Any]]]):
    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def _load(self) -> list[dict[str, Any]]:
        lines = Path(self._filepath).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _save(self, data: list[dict[str, Any]]) -> None:
        atomic_write_text(self._filepath, "".join(json.dumps(row) + "\n" for row in data))

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
