"""One rank of a `launch`: load the task (JSON + Arrow datasets), run the function, rank 0 writes the result.

Run as `accelerate launch ... -m dataflex.distributed.worker task.json`. Only dataflex functions decorated with
`@distributable` run (a task file names code, nothing is unpickled).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any


def resolve_target(target: str) -> Any:
    """The `@distributable` function named "module:function" (a dataflex module), or SystemExit."""
    from dataflex.distributed.launch import is_distributable

    module, _, name = target.partition(":")
    if not module.startswith("dataflex."):
        raise SystemExit(f"{target} is not a dataflex function")
    fn = getattr(importlib.import_module(module), name, None)
    if not is_distributable(fn):
        raise SystemExit(f"{target} is not a @distributable dataflex function")
    return fn


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
    fn = resolve_target(task["target"])
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True + a launched world = MULTI_CPU (gloo)
    records: list[list[Any]] = []
    kwargs = {**{k: _load(v) for k, v in task["datasets"].items()}, **task["kwargs"]}
    if isinstance(kwargs.get("cfg"), dict) and "run_config" in kwargs["cfg"]:
        from dataflex.config import RunConfig

        kwargs["cfg"] = RunConfig.from_params(kwargs["cfg"]["run_config"])
    if task["metrics"]:
        kwargs["metrics_sink"] = lambda logs, step: records.append([logs, step])
    result = fn(**kwargs)
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_json(task["result"], {"result": result, "metrics": records})
    state.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
