"""``DATA_PROCESSING``: a declarative pipeline over rows, in parallel batches (docs/task-types.md).

The payload names its rows (inline ``records`` or a ``source``: a URL, an artifact, another
task's result) and an ordered list of ``operations``. It is checked at create, each problem
named by its JSON path (``operations[2].where.field: this field is required``); a source URL
goes through the SSRF guard here and again, on the resolved address, when it is fetched.
The engine is ``tasks_app.data`` (Polars); the batches and the chord are ``tasks_app.batches``.
Only the payload check is imported here: the engine and Polars load when a pipeline runs, so
the web, beat and Flower stay Polars-free (docs/performance.md, "Process sizes").
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from tasks_app import data, sources
from tasks_app.handlers.registry import Context, register
from tasks_app.http.guard import check_url, parse_allowed_hosts
from tasks_app.task_types import TaskType


def validate_payload(payload: Any) -> list[tuple[str, str]]:
    """The rules beyond the schema (the registry runs this once the schema is satisfied)."""
    problems = data.payload_problems(payload, schema_checked=True)
    if problems:
        return problems
    if "records" in payload:
        return _batch_count_problems(payload)
    ref = sources.reference(payload)
    if "url" in ref:
        message = check_url(ref["url"], parse_allowed_hosts(settings.QW_HTTP_ALLOWED_HOSTS))
        path = "source" if isinstance(payload["source"], str) else "source.url"
        if message is not None:
            problems.append((path, message))
    return problems


def _batch_count_problems(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """Inline records make a known number of batches: more than ``QW_DATA_MAX_BATCHES`` is
    refused at create (a source's rows are counted as it is staged)."""
    rows = len(payload["records"])
    size = payload.get("batch_size", settings.QW_DATA_BATCH_SIZE)
    cap = settings.QW_DATA_MAX_BATCHES
    if rows <= size * cap:
        return []
    return [
        (
            "batch_size",
            f"{rows} records in batches of {size} make more than QW_DATA_MAX_BATCHES ({cap}) "
            f"batches: give a batch_size of at least {-(-rows // cap)}",
        )
    ]


@register(
    TaskType.DATA_PROCESSING,
    schema=data.PAYLOAD_SCHEMA,
    extra_validator=validate_payload,
    owner_validator=sources.owner_problems,
    document=True,
)
def data_processing(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Validate, clean, rename, select, cast, filter, dedupe, sort, aggregate and limit rows
    from inline records, a URL, an artifact or another task's result; large inputs in
    parallel batches. Returns ``{stats, invalid_samples, rows | artifact}``."""
    from tasks_app import batches  # Polars: only where a pipeline runs

    return batches.process(ctx, payload)
