"""Log context: fields bound for a unit of work and copied onto every log record inside it.

The worker pipeline binds ``task_id`` and ``request_id`` (from the message) for the duration of
a task and adds ``type``, ``attempt`` and ``workflow_run_id`` once the claim has read the row; a
web request binds its ``request_id``. ``ContextFilter`` (on the handlers of ``settings.LOGGING``)
copies what is bound onto each record, where ``JsonFormatter`` turns them into fields.

The context lives in a ``ContextVar``, so it follows the thread or asyncio task that bound it and
ends with the ``bind`` block: nothing leaks from one task or request into the next.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

FIELDS = ("task_id", "workflow_run_id", "type", "attempt", "request_id")
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("qw_log_context", default=_EMPTY)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (``None`` values are left out) to the context for the block's duration."""
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def update(**fields: Any) -> None:
    """Add ``fields`` to the context of the enclosing ``bind`` block, which will undo them.

    Outside any ``bind`` block it does nothing: nothing would ever remove the fields.
    """
    if _context.get() is not _EMPTY:
        _context.set(_merged(fields))


def current() -> Mapping[str, Any]:
    """The bound fields (read-only)."""
    return _context.get()


def request_id() -> str | None:
    """The request id of the web request, or of the message, being handled; else ``None``."""
    value = _context.get().get("request_id")
    return value if isinstance(value, str) else None


def valid_request_id(value: Any) -> str | None:
    """``value`` if it is an acceptable request id (1–128 of ``[A-Za-z0-9._-]``), else ``None``."""
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    return None


def _merged(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    # Always a new mapping: ``_EMPTY`` itself means that no ``bind`` block is active.
    added = {k: v for k, v in fields.items() if v is not None}
    return MappingProxyType({**_context.get(), **added})


class ContextFilter(logging.Filter):
    """Copy the bound fields onto each record (fields a call passed in ``extra`` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _context.get()
        if fields:
            attrs = record.__dict__
            for key, value in fields.items():
                attrs.setdefault(key, value)
        return True
