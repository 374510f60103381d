"""Build the embedded default (demo corpus and tiny model) on first use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataflex.data import make_demo_data
from dataflex.train.tiny_model import make_tiny_model
from dataflex.utils.logging import logger

if TYPE_CHECKING:
    from dataflex.config import DataConfig, DemoConfig, ModelConfig


def _same(a: Any, b: Any) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def ensure_demo_assets(demo: DemoConfig, data: DataConfig, model: ModelConfig) -> dict[str, str]:
    """Make the demo corpus / tiny model when the config points at them and they are missing."""
    data_dir, model_dir = demo.data_dir, demo.model_dir
    missing_data = not (Path(data_dir) / "dataset_info.json").exists()
    if demo.build_if_missing and _same(data.dataset_dir, data_dir) and missing_data:
        logger.info("demo corpus missing: building it in %s", data_dir)
        make_demo_data(data_dir, seed=demo.seed)
    if (
        demo.build_if_missing
        and _same(model.model_name_or_path, model_dir)
        and not (Path(model_dir) / "config.json").exists()
    ):
        if not (Path(data_dir) / "dataset_info.json").exists():
            make_demo_data(data_dir, seed=demo.seed)
        logger.info("tiny model missing: building it in %s (a few minutes on 2 CPU cores)", model_dir)
        make_tiny_model(model_dir, data_dir, size=demo.model_size, seed=demo.seed, pretrain_steps=demo.pretrain_steps)
    return {"dataset_dir": str(data.dataset_dir), "model_name_or_path": str(model.model_name_or_path)}


def ensure_demo_proxy(demo: DemoConfig, proxy_model: str) -> None:
    """The demo's DoReMi proxy (a test-size tiny model) when the run's proxy is it and it is missing."""
    if not (demo.build_if_missing and _same(proxy_model, demo.proxy_model_dir)):
        return
    if (Path(proxy_model) / "config.json").exists():
        return
    if not (Path(demo.data_dir) / "dataset_info.json").exists():
        make_demo_data(demo.data_dir, seed=demo.seed)
    logger.info("demo DoReMi proxy missing: building a test-size tiny model in %s", proxy_model)
    make_tiny_model(proxy_model, demo.data_dir, size="test", seed=demo.seed, pretrain_steps=demo.pretrain_steps)
