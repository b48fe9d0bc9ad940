"""Task types of the chaos suite, registered as a deployment registers its own.

Workers load this module through ``QW_HANDLER_MODULES=tests.chaos.handlers``; the test process
imports it, so that the API accepts the type.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from tasks_app.handlers import register

POISON = "CHAOS_POISON"


@register(POISON, schema={"type": "object", "additionalProperties": False})
def poison(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Kill the worker process that runs it, every time (a segfault in a C extension, say)."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process is gone")
