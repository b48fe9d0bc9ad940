"""``NOOP``: the built-in type for smoke tests, demos and benchmarks (docs/concepts.md)."""

from __future__ import annotations

import time
from typing import Any

from tasks_app.errors import PermanentError, RetryableError
from tasks_app.handlers.registry import Context, register
from tasks_app.task_types import TaskType

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sleep_ms": {"type": "integer", "minimum": 0, "maximum": 3_600_000},
        "fail_times": {"type": "integer", "minimum": 0, "maximum": 1000},
        "fail": {"type": "boolean"},
        "result": {"description": "Returned as the task's result."},
    },
}

_CHECK_EVERY_S = 0.2


@register(TaskType.NOOP, schema=SCHEMA)
def noop(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Do nothing, or sleep (``sleep_ms``, at most the task's time limit), fail the first
    ``fail_times`` attempts with a retryable error, or fail for good (``fail``)."""
    if payload.get("fail"):
        raise PermanentError("NOOP asked to fail (fail: true)")
    fail_times = payload.get("fail_times", 0)
    # Attempts ever made (the fencing token), not retries since the last requeue: a task
    # retried by hand after its first attempts failed then succeeds.
    if ctx.attempt <= fail_times:
        raise RetryableError(f"NOOP failing attempt {ctx.attempt} of {fail_times} on purpose")
    sleep_s = min(payload.get("sleep_ms", 0) / 1000, ctx.timeout_s)
    deadline = time.monotonic() + sleep_s
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, _CHECK_EVERY_S))
        ctx.check_cancelled()
    return {"ok": True, "attempt": ctx.attempt, "result": payload.get("result")}
