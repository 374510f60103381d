"""One rank of a `launch`: load the task (JSON + Arrow datasets), run the function, rank 0 writes the result.

Run as `accelerate launch ... -m dataflex.distributed.worker task.json`. Only functions listed in TARGETS run
(a task file names code by an allowlisted name, nothing is unpickled).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

TARGETS = {
    "dataflex.train.runner:train_model",
    "dataflex.train.select:train_segment",
    "dataflex.train.select:compute_features",
    "dataflex.train.mix:train_segment",
    "dataflex.train.less:warmup",
    "dataflex.train.less:checkpoint_features",
}


def _load(ref: Any) -> Any:
    import datasets

    if ref is None:
        return None
    if "dict" in ref:
        return {k: datasets.load_from_disk(p) for k, p in ref["dict"].items()}
    return datasets.load_from_disk(ref["path"])


def main(task_path: str) -> None:
    from accelerate.state import PartialState

    from dataflex.utils.io import atomic_write_json

    task = json.loads(Path(task_path).read_text())
    if task["target"] not in TARGETS:
        raise SystemExit(f"{task['target']} is not a worker target")
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True + a launched world = MULTI_CPU (gloo)
    module, name = task["target"].split(":")
    fn = getattr(importlib.import_module(module), name)
    records: list[list[Any]] = []
    kwargs = {**{k: _load(v) for k, v in task["datasets"].items()}, **task["kwargs"]}
    if task["metrics"]:
        kwargs["metrics_sink"] = lambda logs, step: records.append([logs, step])
    result = fn(**kwargs)
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_json(task["result"], {"result": result, "metrics": records})
    state.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
