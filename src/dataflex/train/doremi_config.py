"""Settings of the one-command DoReMi recipe (`doremi` parameter group, flat YAML keys `doremi_<key>`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dataflex.core.schema import Schema, setting


@dataclass(frozen=True)
class DoremiConfig(Schema):
    """The `doremi` pipeline: reference and proxy on a small model, the final run on `model_name_or_path`."""

    group: ClassVar[str] = "doremi"
    flat_prefix: ClassVar[str | None] = "doremi_"

    proxy_model_name_or_path: str | None = setting(
        None,
        "the small model the reference and proxy runs train (DoReMi's 280M proxy); null: model_name_or_path",
    )
