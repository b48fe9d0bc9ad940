"""``LOG_FORMAT=json``: one JSON object per line, with the task context where it is known."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

_CONTEXT_FIELDS = ("task_id", "workflow_run_id", "type", "attempt", "request_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = str(value) if not isinstance(value, int | float) else value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
