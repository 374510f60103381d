"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    # `kedro run` with no arguments runs the demo end to end: process -> static train -> evaluate -> report.
    if "static" in pipelines:
        pipelines["__default__"] = pipelines["static"]
    return pipelines
