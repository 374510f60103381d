"""Shared fixtures: a small demo corpus and the test-size tiny model, built once per test run (seconds)."""

from __future__ import annotations

import os

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

TEST_DOMAINS = ["arith_train", "reverse_train", "sort_train"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataflex.data import make_demo_data

    out = tmp_path_factory.mktemp("demo") / "demo"
    make_demo_data(out, seed=0, train_per_domain=40, dev_per_domain=8, test_per_domain=16, text_docs_per_domain=40)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    from dataflex.train.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny"
    make_tiny_model(
        out, demo_dir, size="test", seed=0, pretrain_steps=100, block_size=64, batch_size=8, progress_bar=False
    )
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from dataflex.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def sft_pool(demo_dir: Path, tokenizer):
    from dataflex.data import build_dataset

    return build_dataset(
        dataset=TEST_DOMAINS, dataset_dir=demo_dir, tokenizer=tokenizer, template="default", cutoff_len=64, stage="sft"
    )


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]
