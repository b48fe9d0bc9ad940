"""The one spelling of a problem's place in a request: ``payload.url``, ``tasks[3].payload.x``,
``operations[2].where``. No Django import, so the data engine (which runs without Django)
shares it with the create gate and the handlers' schema checks."""

from __future__ import annotations

from typing import Any


def json_path(parts: Any, prefix: str = "") -> str:
    """``parts`` (keys, and list indexes as ints) below ``prefix``, the enclosing value's path:
    ``["operations", 2, "where"]`` → ``operations[2].where``."""
    path = prefix
    for part in parts:
        path = join_path(path, f"[{part}]" if isinstance(part, int) else str(part))
    return path


def join_path(prefix: str, where: str) -> str:
    """``where`` (a path relative to ``prefix``, maybe starting with an index) below ``prefix``."""
    if not where:
        return prefix
    if not prefix or where[0] == "[":
        return prefix + where
    return f"{prefix}.{where}"
