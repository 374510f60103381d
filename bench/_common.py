"""Helpers shared by the bench scripts (imported as `_common`: a script's own folder is sys.path[0])."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quiet_offline_env() -> None:
    """Benchmarks never download and never draw progress bars (they would skew timings and logs)."""
    for key, value in {
        "KEDRO_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }.items():
        os.environ.setdefault(key, value)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def silence_libraries() -> None:
    """Quiet the libraries' own logging and progress bars: the bench prints its table, nothing else."""
    import logging
    import warnings

    import datasets
    import transformers

    from dataflex.utils.logging import logger

    logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")


def demo_groups() -> tuple[dict, dict]:
    """The demo's `model` and `train` parameter groups from conf/base/parameters.yml (model path absolute, no
    progress bar), so the benches train exactly what `kedro run` trains."""
    import yaml

    params = yaml.safe_load((ROOT / "conf" / "base" / "parameters.yml").read_text())
    model = {**params["model"], "model_name_or_path": str(ROOT / params["model"]["model_name_or_path"])}
    return model, {**params["train"], "progress_bar": False}


def report(out: Path | None, title: str, context: str, header: list[str], rows: list[tuple], summary: str) -> None:
    """Print a markdown table of `rows` (numbers to 2 decimals) and the summary line; with `out`, append them to
    it as a section `# title` whose first paragraph is the date and `context` (command, machine, settings)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    table = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in cells)]
    )
    print(table, "\n", summary, sep="")
    if out:
        import datetime as dt

        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        with open(out, "a") as fh:
            fh.write(f"\n# {title}\n\n{stamp}. {context}\n\n{table}\n\n{summary}\n")
