"""Project hooks: stash the merged parameters (for pipelines whose shape depends on them) and validate
them before any node runs, so a config mistake is one clear line, not a failure an hour in."""

from __future__ import annotations

import shutil
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
RESUMABLE = ("checkpoints", "rounds", "adapter", "model")  # what a failed run keeps for its resume


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

    @hook_impl(tryfirst=True)  # before kedro-mlflow's own hook opens (and so creates) the tracking store
    def after_context_created(self, context: Any) -> None:
        global _PARAMS
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
        groups = [n for n in names if n in PIPELINE_GROUPS]
        if _PARAMS is not None and groups:
            # Paths were read when the context was created; this adds the pipeline's own group (less.targets, ...).
            _validate(_PARAMS, lambda p: validate_params(p, check_paths=False, pipelines=groups))
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
    def after_pipeline_run(self) -> None:
        self._release()

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
