"""MLflow helpers used by nodes: log only from the main process and only inside an active run."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mlflow

from dataflex.utils.logging import logger

_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")
_F = TypeVar("_F", bound=Callable[..., Any])
_failed: list[str] = []  # the first tracking failure of this process (said once; tracking is then skipped)


def never_fatal(fn: _F) -> _F:
    """Tracking is a copy of results that are on disk anyway: a store that fails mid-run (server down, disk full,
    locked database) is one warning line, then skipped for the rest of the process, and training goes on."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            _failed.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            logger.warning(
                "MLflow tracking failed (%s); the run goes on without it, its results are in output_dir", _failed[0]
            )
            return None

    return wrapper  # type: ignore[return-value]


def metric_key(name: str) -> str:
    return _BAD.sub("_", name)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def mlflow_metrics_sink(prefix: str = "train/") -> Callable[[dict[str, float], int], None] | None:
    """A sink for the training loop's step metrics, or None when no MLflow run is active."""
    if mlflow.active_run() is None:
        return None

    @never_fatal
    def sink(metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({metric_key(prefix + k): float(v) for k, v in metrics.items()}, step=step)

    return sink


@never_fatal
def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Node-level metrics (cache hits, timings, selection fractions) into the active run, if any."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics({metric_key(k): float(v) for k, v in metrics.items()}, step=step)


@never_fatal
def log_eval_metrics(eval_metrics: Mapping[str, Mapping[str, Any]]) -> None:
    if mlflow.active_run() is None:
        return
    flat = {
        metric_key(f"eval/{name}/{k}"): float(v)
        for name, m in eval_metrics.items()
        for k, v in m.items()
        if isinstance(v, int | float)
    }
    mlflow.log_metrics(flat)


@never_fatal
def log_component(component: Mapping[str, Any] | None) -> None:
    """The parameters the run's component received, as MLflow params `component.<key>` (comparable across runs)."""
    if mlflow.active_run() is None or not component:
        return
    params = {"component.name": component["name"], "component.kind": component["kind"]}
    params.update({metric_key(f"component.{k}"): str(v)[:500] for k, v in component["params"].items()})
    mlflow.log_params(params)


@never_fatal
def log_mixture(history: list[Mapping[str, Any]]) -> None:
    """Proportions per domain at each update step (`mixture/<domain>`)."""
    if mlflow.active_run() is None:
        return
    for entry in history:
        metrics = {metric_key(f"mixture/{n}"): float(p) for n, p in zip(entry["names"], entry["proportions"])}
        mlflow.log_metrics(metrics, step=int(entry["step"]))


def prepare_store(uri: str) -> None:
    """Create (and migrate) a new sqlite MLflow store once, under a lock: two runs starting on the same new database
    would otherwise race on its schema migrations. Other stores are left to MLflow."""
    from dataflex.core.errors import ConfigError
    from dataflex.utils.lock import RunLock

    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///") :])
    if db.is_file() and db.stat().st_size > 0:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with RunLock(db, wait=True):  # the second run waits here until the first has built the schema
        if db.is_file() and db.stat().st_size > 0:
            return
        try:
            mlflow.tracking.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # an unusable store is the user's to fix: one line, before training
            raise ConfigError(f"MLflow store {uri} cannot be created: {' '.join(str(exc).split())[:300]}") from None


@contextlib.contextmanager
def child_run(name: str, params: Mapping[str, Any] | None = None) -> Iterator[str | None]:
    """A nested MLflow run under the active one (e.g. one per compare cell); yields its id, or None without an
    active run or when tracking fails (never fatal: the work inside runs either way)."""
    started = _start_child(name, params or {})
    try:
        yield started
    finally:
        if started is not None:
            _end_child()


@never_fatal
def _start_child(name: str, params: Mapping[str, Any]) -> str | None:
    if mlflow.active_run() is None:
        return None
    run = mlflow.start_run(run_name=name, nested=True)
    if params:
        mlflow.log_params({metric_key(k): str(v)[:500] for k, v in params.items()})
    return run.info.run_id


@never_fatal
def _end_child() -> None:
    mlflow.end_run()
