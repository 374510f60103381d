"""Shared fixtures for all three tiers: a small demo corpus and the test-size tiny model, built once per test run.

`untrained_model_dir` (random init, no training: milliseconds) is for tests that need a model's files, tokenizer
or forward pass but not a trained model; the tests under tests/unit use only it. `tiny_model_dir` is the same
model pre-trained for 100 steps (seconds) for the integration and pipeline tests whose assertions need a trained
model. Both share one tokenizer (pre-training copies the initial folder's tokenizer files unchanged), so
`tokenizer` and `sft_pool` come from the untrained folder and never trigger pre-training."""

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
UNIT_DIR = Path(__file__).resolve().parent / "unit"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The unit tier never trains: a tests/unit test asking for the pre-trained model errors before it is built."""
    if "tiny_model_dir" in getattr(item, "fixturenames", ()) and UNIT_DIR in Path(item.path).resolve().parents:
        pytest.fail("tests/unit must not use tiny_model_dir (it pre-trains): use untrained_model_dir", pytrace=False)


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
def untrained_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """`tiny_model_dir` before pre-training: the same files, tokenizer and config, random initial weights."""
    from dataflex.train.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("model") / "tiny_untrained"
    make_tiny_model(
        out, demo_dir, size="test", seed=0, pretrain_steps=0, block_size=64, batch_size=8, progress_bar=False
    )
    return out


@pytest.fixture(scope="session")
def tokenizer(untrained_model_dir: Path):
    from dataflex.models import load_tokenizer

    return load_tokenizer(str(untrained_model_dir))


@pytest.fixture(scope="session")
def sft_pool(demo_dir: Path, tokenizer):
    from dataflex.data import build_dataset

    return build_dataset(
        dataset=TEST_DOMAINS, dataset_dir=demo_dir, tokenizer=tokenizer, template="default", cutoff_len=64, stage="sft"
    )


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def lora_model_params(model_dir: Path, **kw) -> dict:
    """The `model` group the integration tests train: LoRA r 4 on every linear layer, fp32, no dropout."""
    return {
        "model_name_or_path": str(model_dir),
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "dtype": "fp32",
        **kw,
    }


def train_params(out: Path, **kw) -> dict:
    """The `train` group the integration tests use: micro-batch 4, lr 2e-3, a log line every 2 steps, no bar."""
    from dataflex.config import DEFAULTS

    return {
        **DEFAULTS["train"],
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "learning_rate": 2e-3,
        "logging_steps": 2,
        "progress_bar": False,
        **kw,
    }


def copy_project(root: Path, dest: Path) -> Path:
    """A copy of the Kedro project (pyproject + conf) at dest/project with an empty src/: the package is installed
    already, so a run there uses the code under test with a project folder of its own."""
    import shutil

    project = dest / "project"
    project.mkdir()
    shutil.copy(root / "pyproject.toml", project)
    shutil.copytree(root / "conf" / "base", project / "conf" / "base")
    shutil.copy(root / "conf" / "logging.yml", project / "conf")
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()
    return project


@pytest.fixture
def kedro_project(project_root: Path, tmp_path: Path) -> Path:
    return copy_project(project_root, tmp_path)


@pytest.fixture(autouse=True)
def _log_handlers_on_live_streams():
    """Kedro's logging config binds the console handler to the sys.stdout of the moment, which inside a test is
    pytest's capture stream, closed after that test: point such handlers at the live stream before each test."""
    import logging
    import sys

    for name in (None, "dataflex", "kedro"):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                handler.stream = sys.stdout  # not setStream: it would flush the closed stream
    yield
