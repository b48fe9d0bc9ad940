"""Task types of the integration tests, registered as a deployment registers its own.

Workers load this module through ``QW_HANDLER_MODULES=tests.integration.handlers``; the test
imports it, so that the API accepts the type.
"""

from __future__ import annotations

import time
from typing import Any

from tasks_app.handlers import register

SLEEP = "TEST_SLEEP"


@register(
    SLEEP,
    schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"sleep_ms": {"type": "integer", "minimum": 0}},
    },
)
def sleep(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Sleep without touching the database (``NOOP`` checks for a cancel as it sleeps), so a
    database outage reaches the task only when its outcome is recorded."""
    time.sleep(payload.get("sleep_ms", 0) / 1000)
    return {"slept_ms": payload.get("sleep_ms", 0)}
