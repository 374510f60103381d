"""`TrainStateDataset`: one round's TrainState, owned by the catalog.

The value is the round's record (`round`, `step`, `checkpoint`, and whatever the mode adds: proportions, the
run's summary on the last round). Saving verifies the loop's checkpoint named in `checkpoint` (a complete
manifest, not a half-written directory) and links its files into `<path>/checkpoint` (hard links: no second
copy on disk; a copy across filesystems), written to a temp dir and renamed into place; then `<path>/state.json`
records the round with `checkpoint` pointing at the catalog's copy. Loading verifies that copy again, so a
round never resumes from a truncated or foreign state.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset

from dataflex.train.trainer.state import read_manifest
from dataflex.utils.io import atomic_write_json, link_into


class TrainStateDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = PurePosixPath(path)
        self.metadata = metadata

    @property
    def _filepath(self) -> PurePosixPath:  # where kedro-mlflow / kedro-viz look
        return self._path / "state.json"

    def _load(self) -> dict[str, Any]:
        record = json.loads(Path(self._filepath).read_text())
        read_manifest(record["checkpoint"], verify_hashes=False)
        return record

    def _save(self, data: dict[str, Any]) -> None:
        source = Path(data["checkpoint"])
        read_manifest(source, verify_hashes=False)  # refuse a truncated checkpoint before touching anything
        target = link_into(source, Path(self._path) / "checkpoint")
        atomic_write_json(self._filepath, {**data, "checkpoint": str(target)})

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
