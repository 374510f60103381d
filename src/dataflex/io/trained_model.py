"""`TrainedModelDataset`: the run's trained adapter (LoRA) or model (full fine-tuning), owned by the catalog.

The value is a handle, `{"kind": "adapter" | "model", "path": ..., "base_model": ...}`: the run core saves the
weights where the output contract says (`<output_dir>/adapter` or `/model`), also from launched workers, and
hands over where. Saving verifies the folder is a complete Hugging Face / peft save (config and safetensors
weights), links it into `<path>/<kind>` when it lives elsewhere (temp dir + rename), and records the handle in
`<path>/trained_model.json`; loading verifies the folder again.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset

from dataflex.core.errors import DataError
from dataflex.utils.io import atomic_write_json, link_into

_REQUIRED = {"adapter": ("adapter_config.json", "adapter_model.safetensors"), "model": ("config.json",)}


def check_trained(folder: Path, kind: str) -> None:
    missing = [name for name in _REQUIRED[kind] if not (folder / name).is_file()]
    if kind == "model" and not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise DataError(f"trained {kind} '{folder}' is incomplete (missing {', '.join(missing)}); train it again")


class TrainedModelDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = PurePosixPath(path)
        self.metadata = metadata

    @property
    def _filepath(self) -> PurePosixPath:
        return self._path / "trained_model.json"

    def _save(self, data: dict[str, Any]) -> None:
        kind, source = data["kind"], Path(data["path"])
        if kind not in _REQUIRED:
            raise DataError(f"trained model kind '{kind}' is not adapter or model")
        check_trained(source, kind)
        target = link_into(source, Path(self._path) / kind)
        atomic_write_json(self._filepath, {**data, "path": str(target)})

    def _load(self) -> dict[str, Any]:
        record = json.loads(Path(self._filepath).read_text())
        check_trained(Path(record["path"]), record["kind"])
        return record

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
