"""Project hooks: stash the merged parameters (for pipelines whose shape depends on them) and validate
them before any node runs, so a config mistake is one clear line, not a failure an hour in."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from dataflex.config import PIPELINE_GROUPS, TRAIN_TYPES, validate_params
from dataflex.core.errors import DataFlexError
from dataflex.tracking import prepare_store
from dataflex.utils.io import remove_stale_temp
from dataflex.utils.lock import RunLock, claim_output_dir
from dataflex.utils.logging import logger

_PARAMS: dict[str, Any] | None = None
# Pipelines that read a run's inputs or outputs but start no run: they may share an output_dir with one.
NOT_TRAINING = {"data_processing", "evaluation", "reporting"}
# What a failed run keeps for its resume (compare: the finished cells, each with its run_summary.json).
RESUMABLE = ("checkpoints", "rounds", "adapter", "model", "compare")


DEFAULT_PIPELINE = "static"  # what a bare `kedro run` (`__default__`) runs
MODELS_DIR = "data/06_models"


def requested_pipelines() -> list[str]:
    """The pipeline names of the `kedro run` / session.run in progress ([] outside a run, or for the default)."""
    from kedro.framework.project import pipelines

    # Kedro records them before it creates the run's context (and so before conf/ is read): the one place to learn
    # them in time for a default that depends on them.
    return [n for n in (getattr(pipelines, "_requested_pipelines", None) or []) if n != "__default__"]


def run_mode(names: list[str] | None = None) -> str:
    """The pipeline a run's outputs are named after: the first one that trains, else the demo's (`static`)."""
    names = requested_pipelines() if names is None else names
    known = set(registered_pipelines()) - NOT_TRAINING
    return next((n for n in names if n in known), DEFAULT_PIPELINE)


def default_output_dir(root: str = MODELS_DIR) -> str:
    """`${dataflex_output_dir:}` in conf/base/globals.yml: each pipeline's own default output folder,
    `<root>/<pipeline>`, so a LESS run never replaces the demo's model; `train.output_dir` still overrides it."""
    return f"{root.rstrip('/')}/{run_mode()}"


def registered_pipelines() -> list[str]:
    """The pipelines `kedro run --pipelines` accepts: one package per pipeline under dataflex/pipelines (what
    find_pipelines registers), read without importing any of them."""
    import pkgutil

    import dataflex.pipelines

    return sorted(m.name for m in pkgutil.iter_modules(dataflex.pipelines.__path__) if m.ispkg)


def check_pipeline_names(names: list[str]) -> None:
    """One line and exit code 2 for a pipeline name that is not registered (Kedro would print an ImportError
    traceback of a hundred lines)."""
    from dataflex.core.schema import did_you_mean

    known = registered_pipelines()
    unknown = [n for n in names if n not in known and n != "__default__"]
    if unknown:
        hint = did_you_mean(unknown[0], known)
        sys.stderr.write(f"error: unknown pipeline {unknown[0]!r}{hint}; registered pipelines: {', '.join(known)}\n")
        raise SystemExit(2)


def mlflow_run_name() -> str | None:
    """`${dataflex_run_name:}` in conf/base/mlflow.yml: the MLflow run's name says the mode, its component and its
    targets (`dynamic_weight:loss`, `less:arith_dev`, `static_select:near:arith_dev`), so two runs that differ only
    there are told apart in the MLflow UI. None (kedro-mlflow then uses the pipeline name) outside a run."""
    params = _PARAMS
    if params is None:
        return None
    mode = run_mode()
    dataflex = params.get("dataflex") or {}
    parts = [mode]
    if mode.startswith("dynamic_") and dataflex.get("component_name"):
        parts.append(str(dataflex["component_name"]))
    group = params.get(mode) if mode in ("less", "static_select") else None
    if isinstance(group, dict):
        if mode == "static_select" and group.get("selector"):
            parts.append(str(group["selector"]))
        targets = group.get("targets") or []
        targets = [targets] if isinstance(targets, str) else targets
        parts.append(",".join("+".join(map(str, t)) if isinstance(t, list | tuple) else str(t) for t in targets))
    return ":".join(p for p in parts if p)


def get_params() -> dict[str, Any] | None:
    """The merged parameters of the current run (with --env / --params), if a run has started."""
    return _PARAMS


def _validate(params: Any, check: Any = validate_params) -> Any:
    try:
        return check(params)
    except DataFlexError as exc:
        logger.error("%s", exc)
        # SystemExit with a message: kedro's CLI exits non-zero with this one line, no traceback.
        raise SystemExit(f"error: {exc}") from None


class ProjectHooks:
    _lock: RunLock | None = None
    _created: Path | None = None  # the output_dir this run created (removed again if it fails before any state)
    _started: float = 0.0

    @hook_impl(tryfirst=True)  # before kedro-mlflow's own hook opens (and so creates) the tracking store
    def after_context_created(self, context: Any) -> None:
        global _PARAMS
        _PARAMS = None  # a previous run's, in this process
        check_pipeline_names(requested_pipelines())
        _PARAMS = dict(context.config_loader["parameters"])
        _validate(_PARAMS)
        uri = _tracking_uri(context)
        if uri:
            _validate(uri, prepare_store)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        """A pipeline run by name: `less` / `static_select` check their group; a mode's pipeline
        (`--pipelines=dynamic_weight`) is that train_type: check its component."""
        names = run_params.get("pipeline_names") or []
        self._started = time.time()
        _headless_plots()
        groups = [n for n in names if n in (*PIPELINE_GROUPS, "doremi")]
        if _PARAMS is not None and groups:
            # Paths were read when the context was created; this adds the pipeline's own group (less.targets, ...).
            _validate(_PARAMS, lambda p: validate_params(p, check_paths=False, pipelines=groups))
        if _PARAMS is not None and "compare" in names:
            # Every arm x seed checked as the run it will be (unknown component, different base, budget): one line
            # here rather than a failure of the compare plan node.
            from dataflex.pipelines.compare.cells import plan_cells

            _validate(_PARAMS, plan_cells)
        modes = [n for n in names if n in TRAIN_TYPES and n != "static"]
        if _PARAMS is not None and modes:
            _validate({**_PARAMS, "dataflex": {**_PARAMS["dataflex"], "train_type": modes[0]}})
        if _PARAMS is not None:
            from dataflex.data.processing import CREATED_ENTRIES

            CREATED_ENTRIES.clear()  # this run's own cache writes, from here on
            # One run per output_dir: a second concurrent run is refused before it writes anything there.
            train = _PARAMS["train"]
            output_dir = train["output_dir"]
            try:
                self._lock = RunLock(output_dir).acquire()
                self._created = None if Path(output_dir).exists() else Path(output_dir)
                if not set(names or ["__default__"]) <= NOT_TRAINING:
                    resuming = train.get("resume_from_checkpoint") not in (None, False, "false", "False")
                    overwrite = bool(train.get("overwrite_output_dir"))
                    if claim_output_dir(output_dir, overwrite=overwrite, resuming=resuming):
                        logger.info("overwrite_output_dir: removed the previous run in %s", output_dir)
            except DataFlexError as exc:
                self._release()
                logger.error("%s", exc)
                raise SystemExit(f"error: {exc}") from None
            removed = remove_stale_temp(output_dir)  # what a killed run of this output_dir left half-written
            if removed:
                logger.info("removed %d unfinished temporary file(s) of an interrupted run in %s", removed, output_dir)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any]) -> None:
        self._release()
        if _PARAMS is not None:
            label = "+".join(run_params.get("pipeline_names") or []) or DEFAULT_PIPELINE
            print(end_of_run_summary(label, _PARAMS, self._started))

    @hook_impl
    def on_pipeline_error(self, error: Exception) -> None:
        # A run refused after tokenising (all rows filtered, a selection larger than the pool, ...) leaves nothing:
        # the output_dir it created goes again, unless it already holds state a resume needs, and the MLflow run
        # kedro-mlflow has just closed as FAILED is deleted (a refusal is not a run).
        from dataflex.data.processing import remove_created_entries

        created = self._created
        if created is not None and not any((created / m).exists() for m in RESUMABLE):
            shutil.rmtree(created, ignore_errors=True)
            if isinstance(error, DataFlexError):
                remove_created_entries()
                _delete_failed_mlflow_run()
        self._release()

    def _release(self) -> None:
        self._created = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _tracking_uri(context: Any) -> str | None:
    """The tracking URI kedro-mlflow will use (from conf/*/mlflow.yml), read before kedro-mlflow opens it."""
    loader = context.config_loader
    loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    try:
        uri = loader["mlflow"]["server"]["mlflow_tracking_uri"]
    except Exception:  # no mlflow.yml (kedro-mlflow not configured): nothing to prepare
        return None
    return uri if isinstance(uri, str) else None


def _delete_failed_mlflow_run() -> None:
    """Delete the MLflow run of a refused pipeline, whether kedro-mlflow already closed it as FAILED or (hook order)
    it is still open: then it is closed here first, and kedro-mlflow finds nothing left to close."""
    import mlflow

    try:
        active = mlflow.active_run()
        if active is not None:
            mlflow.end_run("FAILED")
        run = mlflow.last_active_run()
        if run is not None and run.info.status == "FAILED":
            mlflow.tracking.MlflowClient().delete_run(run.info.run_id)
    except Exception as exc:  # tracking trouble must not hide the refusal's own one line
        logger.debug("could not delete the refused run's MLflow record: %s", exc)


def _headless_plots() -> None:
    """A pipeline run saves its plots as files and MLflow artifacts: the Agg backend, unless the run is inside an
    IPython kernel (a notebook), whose inline backend must stay so that the notebook's own plots still show."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is None or not hasattr(shell, "kernel"):
        import matplotlib

        matplotlib.use("Agg")


def end_of_run_summary(label: str, params: dict[str, Any], started: float = 0.0) -> str:
    """What `kedro run` and `dataflex-cli train` print last: where the outputs went, the run's numbers and its
    eval table (from run_summary.json, when this run wrote one), and the MLflow run."""
    out = Path(params["train"]["output_dir"])
    summary_file = out / "run_summary.json"
    lines = [f"dataflex: {label} run finished"]
    summary: dict[str, Any] = {}
    if summary_file.is_file() and summary_file.stat().st_mtime >= started:
        import json

        summary = json.loads(summary_file.read_text())
    if out.is_dir():
        what = [n for n in ("adapter/", "model/", "train_result.json", "run_summary.json") if (out / n).exists()]
        lines.append(f"  outputs:  {out}/" + (f" ({', '.join(what)})" if what else ""))
    reports = Path("data/08_reporting")
    if reports.is_dir():
        lines.append(f"  reports:  {reports}/ (metrics table, loss curve and plots)")
    if summary:
        lines.append(
            f"  global_step={summary.get('global_step')}  train_samples_seen={summary.get('train_samples_seen')}  "
            f"final_train_loss={_number(summary.get('final_train_loss'))}"
        )
        evals = summary.get("eval") or {}
        if evals:
            lines.append("  | eval set | loss | perplexity | accuracy |")
            lines.append("  |---|---|---|---|")
            for name, m in evals.items():
                acc = _number(m.get("accuracy"), 3) if "accuracy" in m else "-"
                lines.append(f"  | {name} | {_number(m.get('loss'))} | {_number(m.get('perplexity'), 2)} | {acc} |")
        run_id = summary.get("mlflow_run_id")
        if run_id:
            uri = _tracking_uri_now()
            lines.append(f"  MLflow:   run {run_id} in {uri} (browse: mlflow ui --backend-store-uri {uri})")
    return "\n".join(lines)


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _tracking_uri_now() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
