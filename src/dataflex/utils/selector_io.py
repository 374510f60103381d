"""DataFlex's selection cache, for selectors written against it: one JSON file per selection,
`{"indices": [...], "metric": {...}}` (indent 4), conventionally `<cache_dir>/step_<global step>.json`.

Same functions, signatures and format as DataFlex's `dataflex.utils.selector_io`; the file is written atomically
(a killed run leaves no half-written cache). The key is the path alone, so a selector using it reuses whatever
selection sits there; this project's own selections are keyed by content instead (`OUTPUT_DIR/selections`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from dataflex.utils.io import atomic_write_json
from dataflex.utils.logging import logger

__all__ = ["load_cached_selection", "save_selection"]


def _ensure_parent_dir(path: str) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


def load_cached_selection(save_path: str) -> tuple[list[int] | None, dict[str, list] | None]:
    """(indices, metric) of a saved selection; missing keys read as empty."""
    with open(save_path) as f:
        payload = json.load(f)
    indices = payload.get("indices", [])
    metric = payload.get("metric", {})
    logger.info("[Dataflex] Loaded cached selection from %s: %s.", save_path, indices is not None)
    return indices, metric


def save_selection(save_path: str, indices: list[int], metric: dict[str, list], accelerator: Any) -> None:
    """Write the selection (main process only; the others return at once)."""
    if accelerator is not None and not accelerator.is_main_process:
        return
    _ensure_parent_dir(save_path)
    atomic_write_json(save_path, {"indices": [int(i) for i in indices], "metric": metric}, indent=4)
    logger.info("[Dataflex] Saved selection to %s.", save_path)
