"""Kedro datasets for dataflex's artefacts: the catalog decides where each one lives (under the run's
`train.output_dir` by default, see conf/base/catalog.yml) and these write them atomically.

- `TrainStateDataset`: a round's TrainState (weights, Adam moments, plan, component state, RNG) as a directory
  with its manifest, plus the round's JSON record; saving links the loop's finished checkpoint into place
  (temp dir + rename) and refuses a truncated one; loading verifies it and points the record at it.
- `TrainedModelDataset`: the trained adapter / model, verified complete and recorded where it is.
- `SelectionDataset`: a one-shot selection (LESS, static_select): per-target selection JSON, the selected rows as
  jsonl, the pool's score table, and the summary written last.
- `JSONLinesDataset`: one JSON object per line (mixture histories), written atomically.
- `ReportDataset`: a report saved by its own dataset and copied to the MLflow run (a tracking failure never
  fails the run).
"""

from dataflex.io.jsonlines import JSONLinesDataset
from dataflex.io.report import ReportDataset
from dataflex.io.selection import SelectionDataset
from dataflex.io.train_state import TrainStateDataset
from dataflex.io.trained_model import TrainedModelDataset

__all__ = ["JSONLinesDataset", "ReportDataset", "SelectionDataset", "TrainStateDataset", "TrainedModelDataset"]
