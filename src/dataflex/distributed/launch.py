"""The orchestrating side of scale-out: run a library function on N processes with `accelerate launch`.

Kedro stays one process (a launched Kedro session would run every node on every rank). A library function
decorated with `@distributable` runs on `num_processes` workers when its run config asks for more than one:
datasets are handed over as the Arrow files they were loaded from (the catalog's; a derived dataset is saved to
the work directory first), other arguments as JSON, and `python -m accelerate.commands.launch ... -m
dataflex.distributed.worker task.json` runs the same function on every rank. Rank 0 writes the result (JSON) once
everyone finished; the metrics the ranks' Trainer would have logged come back with it and are logged here, so
only this process talks to MLflow. State passes through TrainState directories, as between in-process rounds.

A worker that dies (killed, out of memory, an exception) stops the launch (torchrun ends the other ranks); the
node raises one line naming the log, and nothing is half-written: checkpoints and outputs are written by
rank 0 with temp + rename, and a re-run resumes from the last checkpoint.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dataflex.core.errors import ConfigError, DataFlexError
from dataflex.utils.io import atomic_write_json
from dataflex.utils.logging import logger

WORKER_ENV = "DATAFLEX_WORKER"
MetricsSink = Callable[[dict[str, float], int], None]


class WorkerError(DataFlexError):
    """A launched worker process failed."""


def in_worker() -> bool:
    """True inside a process started by `launch` (the function then runs its work here, on this rank)."""
    return os.environ.get(WORKER_ENV) == "1"


def distributed(train_params: Mapping[str, Any] | None) -> bool:
    """Should this call start workers? (num_processes > 1 and we are the orchestrating process.)"""
    return int((train_params or {}).get("num_processes") or 1) > 1 and not in_worker()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_disk(ds: Any) -> str | None:
    """The `save_to_disk` folder `ds` was loaded from unchanged (a catalog ArrowDataset), else None."""
    files = getattr(ds, "cache_files", None)
    if not files or getattr(ds, "_indices", None) is not None or len(files) != 1:
        return None
    folder = Path(files[0]["filename"]).parent
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return str(folder) if state.get("_fingerprint") == getattr(ds, "_fingerprint", None) else None


def _save_datasets(datasets: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """Where each input dataset (a dataset, a dict of datasets, or None) can be loaded from on a worker."""

    def ref(ds: Any, path: Path) -> str:
        existing = _on_disk(ds)
        if existing is not None:
            return existing
        ds.save_to_disk(str(path))
        return str(path)

    refs: dict[str, Any] = {}
    for name, value in datasets.items():
        if value is None:
            refs[name] = None
        elif isinstance(value, Mapping):
            refs[name] = {"dict": {key: ref(ds, root / name / str(key)) for key, ds in value.items()}}
        else:
            refs[name] = {"path": ref(value, root / name)}
    return refs


def launch_command(
    num_processes: int, task: Path, *, accelerate_config: str | None = None, mixed_precision: str = "no"
) -> list[str]:
    """The `accelerate launch` command line: DDP by default, or the given accelerate config file."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
        "--dynamo_backend",
        "no",
    ]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    else:  # also on CPU: MULTI_CPU with gloo (`--cpu` would start one process)
        cmd += ["--num_machines", "1", "--mixed_precision", mixed_precision, "--multi_gpu"]
    return [*cmd, "-m", "dataflex.distributed.worker", str(task)]


def check_launch_config(params: Mapping[str, Any]) -> None:
    """The scale-out settings' errors (missing or unsupported launch configs), before any work."""
    for key in ("accelerate_config", "deepspeed"):
        path = params.get(key)
        if path and not Path(path).is_file():
            kind = "accelerate config YAML" if key == "accelerate_config" else "DeepSpeed JSON"
            raise ConfigError(f"{key} file {path} does not exist; give the path of an existing {kind}")
    if params.get("deepspeed"):
        from dataflex.distributed.fsdp import settings_from_deepspeed

        settings = settings_from_deepspeed(params["deepspeed"])  # a bad JSON or stage is one line here
        if int(params.get("num_processes") or 1) == 1:
            # ZeRO partitions weights, gradients and optimizer state across processes: one process has nothing
            # to partition and takes the same optimizer steps without it (DataFlex's example YAMLs name ZeRO files).
            logger.warning(
                "deepspeed %s: ZeRO shards across processes and this run has one, so it trains unsharded "
                "(same updates)",
                params["deepspeed"],
            )
        elif settings is not None:
            logger.warning("%s", settings.notes[0])
    path = params.get("accelerate_config")
    if path:
        import yaml

        try:
            cfg = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"accelerate_config {path} is not valid YAML: {exc}") from None
        kind = str(cfg.get("distributed_type", "")).upper()
        if kind in ("FSDP", "DEEPSPEED"):
            raise ConfigError(_SHARDED.format(kind=kind))
        n = cfg.get("num_processes")
        ours = int(params.get("num_processes") or 1)
        if n is not None and int(n) != ours:
            raise ConfigError(
                f"accelerate_config {path} has num_processes {n} but train.num_processes is {ours}; "
                "make them equal (the global batch uses it)"
            )


# Sharding is the loop's own (`dataflex.distributed.fsdp`, FSDP2 over the launched processes), so an accelerate
# config that asks accelerate to shard is pointed at the run's keys instead.
_SHARDED = (
    "an accelerate config with distributed_type {kind} is not used: set train.fsdp (FSDP2: full_shard | "
    "shard_grad_op [offload]) or deepspeed (a ZeRO JSON, mapped onto FSDP2) with distributed_type MULTI_GPU / MULTI_CPU"
)


def launch(
    target: str,
    train_params: Mapping[str, Any],
    *,
    datasets: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    metrics_sink: MetricsSink | None = None,
) -> Any:
    """Run `target` ("module:function", one of worker.TARGETS) on `train_params['num_processes']` processes with
    `datasets` (Arrow-saved) and JSON `kwargs`; returns rank 0's result. Metrics are replayed into `metrics_sink`."""
    check_launch_config(train_params)
    n = int(train_params["num_processes"])
    work = Path(train_params.get("output_dir") or ".") / ".workers" / f"{target.split(':')[1]}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "worker.log"
    try:
        task = {
            "target": target,
            "datasets": _save_datasets(datasets, work / "inputs"),
            "kwargs": dict(kwargs),
            "metrics": metrics_sink is not None,
            "result": str(work / "result.json"),
        }
        atomic_write_json(work / "task.json", task)
        mixed = str(train_params.get("mixed_precision") or "no")
        if mixed == "fp16" and not torch.cuda.is_available():
            mixed = "no"
        cmd = launch_command(
            n, work / "task.json", accelerate_config=train_params.get("accelerate_config"), mixed_precision=mixed
        )
        env = {**os.environ, WORKER_ENV: "1", "PYTHONUNBUFFERED": "1"}
        if not torch.cuda.is_available():  # share the cores instead of oversubscribing them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        logger.info("%s: starting %d processes (accelerate launch), log %s", target, n, log)
        tail = _run(cmd, env, log)
        result_path = Path(task["result"])
        if tail is not None or not result_path.is_file():
            reason = failure_reason(tail or ["no result written"])
            raise WorkerError(f"{target} failed on {n} processes: {reason}; full log: {log}")
        out = json.loads(result_path.read_text())
    finally:
        shutil.rmtree(work / "inputs", ignore_errors=True)
    if metrics_sink is not None:
        for logs, step in out.get("metrics", []):
            metrics_sink(logs, step)
    shutil.rmtree(work, ignore_errors=True)
    return out["result"]


_RANK_ERROR = re.compile(r"^\[rank(\d+)\]: ([A-Za-z_.]*(?:Error|Exception|Interrupt)\b.*)$")
_SIGNAL = re.compile(r"Signal (\d+) \((SIG\w+)\) received by PID")


_KNOCK_ON = re.compile(r"gloo|nccl|Connection (reset|closed)|ProcessGroup|DistBackendError", re.IGNORECASE)


def failure_reason(lines: list[str]) -> str:
    """The one line that says why: a rank's own exception, else a signal that killed a rank, else the other
    ranks' knock-on errors (a lost peer), else the last line."""
    errors = [m for m in (_RANK_ERROR.match(line.strip()) for line in lines) if m]
    own = [m for m in errors if not _KNOCK_ON.search(m.group(2))]
    if own:
        return f"rank {own[0].group(1)}: {own[0].group(2)[:400]}"
    for line in lines:
        m = _SIGNAL.search(line)
        if m and m.group(2) != "SIGTERM":  # SIGTERM is torchrun stopping the survivors
            return f"a worker was killed by {m.group(2)}"
    if errors:
        return f"rank {errors[0].group(1)}: {errors[0].group(2)[:400]}"
    return lines[-1].strip()[:400]


def _run(cmd: list[str], env: Mapping[str, str], log: Path) -> list[str] | None:
    """Run the launcher, echoing its output (progress bars included) and keeping it in `log`; None on success,
    else the last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with (
        open(log, "w") as fh,
        subprocess.Popen(
            cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            tail.append(line)
            sys.stderr.write(line)
        code = proc.wait()
    return None if code == 0 else [*tail, f"exit status {code}"]


# ------------------------------------------------------------------------------------------ the decorator

_DISTRIBUTABLE_ATTR = "__dataflex_distributable__"


def _is_dataset(value: Any) -> bool:
    import datasets

    if isinstance(value, datasets.Dataset | datasets.DatasetDict):
        return True
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, datasets.Dataset) for v in value.values())


def distributable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn` on `cfg.train.num_processes` accelerate workers when that is > 1 (and we are not a worker).

    `fn` takes a run config (`cfg`, a RunConfig), datasets and JSON-serialisable arguments, and an optional
    `metrics_sink`; it returns rank 0's JSON result. Only functions carrying this decorator run on workers."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        cfg = bound.arguments.get("cfg")
        if cfg is None or not distributed({"num_processes": cfg.train.num_processes}):
            return fn(*args, **kwargs)
        sink = bound.arguments.pop("metrics_sink", None)
        data = {k: v for k, v in bound.arguments.items() if k != "cfg" and _is_dataset(v)}
        plain = {k: v for k, v in bound.arguments.items() if k not in data and k != "cfg"}
        return launch(
            f"{fn.__module__}:{fn.__qualname__}",
            cfg.train.to_dict(),
            datasets=data,
            kwargs={**plain, "cfg": {"run_config": cfg.to_params()}},
            metrics_sink=sink,
        )

    setattr(wrapper, _DISTRIBUTABLE_ATTR, True)
    return wrapper


def is_distributable(fn: Any) -> bool:
    return bool(getattr(fn, _DISTRIBUTABLE_ATTR, False))
