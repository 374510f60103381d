"""Build the embedded default (demo corpus and tiny model) on first use."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dataflex.data import make_demo_data
from dataflex.train.tiny_model import make_tiny_model
from dataflex.utils.logging import logger


def _same(a: Any, b: Any) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def ensure_demo_assets(demo: Mapping[str, Any], data: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, str]:
    """Make the demo corpus / tiny model when the config points at them and they are missing."""
    data_dir, model_dir = demo.get("data_dir"), demo.get("model_dir")
    build = demo.get("build_if_missing", False)
    if build and _same(data["dataset_dir"], data_dir) and not (Path(data_dir) / "dataset_info.json").exists():
        logger.info("demo corpus missing: building it in %s", data_dir)
        make_demo_data(data_dir, seed=demo.get("seed", 0))
    if build and _same(model["model_name_or_path"], model_dir) and not (Path(model_dir) / "config.json").exists():
        if not (Path(data_dir) / "dataset_info.json").exists():
            make_demo_data(data_dir, seed=demo.get("seed", 0))
        logger.info("tiny model missing: building it in %s (a few minutes on 2 CPU cores)", model_dir)
        make_tiny_model(
            model_dir,
            data_dir,
            size=demo.get("model_size", "default"),
            seed=demo.get("seed", 0),
            pretrain_steps=demo.get("pretrain_steps", 300),
        )
    return {"dataset_dir": str(data["dataset_dir"]), "model_name_or_path": str(model["model_name_or_path"])}
