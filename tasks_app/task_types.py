"""The names of the built-in task types, importable anywhere (no model, no Django setup)."""

from __future__ import annotations

from enum import StrEnum


class TaskType(StrEnum):
    """The built-in task types. A deployment registers more by name (``tasks_app.handlers``),
    so a task's ``type`` is any registered name, these included; a member compares equal to
    its name."""

    NOOP = "NOOP"
    HTTP_REQUEST = "HTTP_REQUEST"
    DATA_PROCESSING = "DATA_PROCESSING"
    COMPENSATION = "COMPENSATION"
