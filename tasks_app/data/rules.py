"""What the create-time payload check shares with the engine, without importing Polars.

The web, beat and Flower processes validate DATA_PROCESSING payloads (``payload``,
``payload_ops``) but never run a pipeline; keeping these names here lets them do so without
loading Polars (tens of MB per process, docs/performance.md). The engine modules import them
from here, so there is one definition of each.
"""

from __future__ import annotations

from typing import Any

import jsonschema_rs

from tasks_app.paths import json_path as json_path  # re-exported for the engine

PREFIX = "__qw_"


def row_validator(schema: Any) -> Any:
    """jsonschema-rs on the linear-time regex engine, never fetching a remote ``$ref``.

    Raises ``ValueError`` for a schema it cannot use; the payload check builds one first.
    """
    return jsonschema_rs.Draft202012Validator(
        schema,
        validate_formats=False,
        pattern_options=jsonschema_rs.RegexOptions(),
        offline=True,
    )
