# The README's two commands: `make demo` and `make test`. Both set up .venv first (torch pinned to the
# local CPU build, then the project), so they work from a fresh clone with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dataflex-installed
export KEDRO_DISABLE_TELEMETRY := true

.PHONY: setup demo test test-unit test-integration test-pipelines lint bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,notebook]"  # notebook: Jupyter, and the fresh-clone test executes the notebook
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/kedro run

# Lint first: a formatting or lint error fails the tests (and CI) in seconds. `make test` runs every tier.
test: lint
	$(BIN)/python -m pytest

# One tier at a time (tiers are folders). tests/unit never trains: under a minute on two cores.
# tests/integration trains, selects, mixes and weights on the tiny model; tests/pipelines runs whole pipelines.
test-unit: setup
	$(BIN)/python -m pytest tests/unit

test-integration: setup
	$(BIN)/python -m pytest tests/integration

test-pipelines: setup
	$(BIN)/python -m pytest tests/pipelines

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup
	$(BIN)/python bench/bench_static_step.py

# Everything the demo and the README's commands create (the data/*/.gitkeep files stay).
clean-demo:
	rm -rf data/01_raw/demo data/01_raw/tiny_llama data/02_intermediate/* data/03_primary/* data/04_feature/* \
		data/05_model_input/* data/06_models/* data/07_model_output/* data/08_reporting/* mlflow.db mlruns saves
