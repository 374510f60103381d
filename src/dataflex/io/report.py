"""`ReportDataset`: a report (plot, table, summary) saved by its own Kedro dataset, then copied into the active
MLflow run as an artifact. Like kedro-mlflow's `MlflowArtifactDataset`, except that a tracking failure is one
warning line and never fails the node: the file on disk is the result, the MLflow copy is a convenience."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from kedro.io import AbstractDataset

from dataflex.tracking import never_fatal


@never_fatal
def _log_artifact(path: str, artifact_path: str | None) -> None:
    if mlflow.active_run() is None:
        return
    if Path(path).is_dir():  # a folder artefact (a selection): its files
        mlflow.log_artifacts(path, artifact_path=artifact_path)
    else:
        mlflow.log_artifact(path, artifact_path=artifact_path)


class ReportDataset(AbstractDataset[Any, Any]):
    def __init__(
        self, dataset: dict[str, Any], artifact_path: str | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        self._filepath = str(dataset.get("filepath") or dataset["path"])  # a file, or a folder dataset's path
        self._dataset = AbstractDataset.from_config("report", dict(dataset))
        self._artifact_path = artifact_path
        self.metadata = metadata

    def _load(self) -> Any:
        return self._dataset.load()

    def _save(self, data: Any) -> None:
        self._dataset.save(data)
        _log_artifact(self._filepath, self._artifact_path)

    def _exists(self) -> bool:
        return self._dataset.exists()

    def _describe(self) -> dict[str, Any]:
        return {"dataset": self._dataset._describe(), "artifact_path": self._artifact_path}
