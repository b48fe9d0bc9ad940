"""Log output: ``LOG_FORMAT=json`` (one JSON object per line) or ``console`` (for people).

Every process (web, worker, beat) logs through the handler of ``settings.LOGGING``, whose filters
add the bound context (``queueworker.logcontext``) and redact secrets
(``queueworker.redaction``). Celery would set up its own handlers and print its banners and
shutdown notices as plain text; ``connect_celery`` makes it use ``settings.LOGGING`` instead and,
under ``LOG_FORMAT=json``, turns what it prints into JSON lines too.
"""

from __future__ import annotations

import builtins
import json
import logging
import logging.config
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from queueworker.logcontext import FIELDS as CONTEXT_FIELDS

# Fields a call may pass in ``extra`` that become JSON fields (others are not shown: an extra
# bypasses redaction, so only known, harmless ones are taken).
EXTRA_FIELDS = ("outcome", "duration_ms")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class JsonFormatter(logging.Formatter):
    """``timestamp, level, logger, message``, the context fields that are known, ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        attrs = record.__dict__
        for field in CONTEXT_FIELDS + EXTRA_FIELDS:
            value = attrs.get(field)
            if value is not None:
                entry[field] = value if isinstance(value, int | float) else str(value)
        # RedactingFilter leaves the traceback, formatted and redacted, in exc_text.
        exc_text = record.exc_text
        if not exc_text and record.exc_info and record.exc_info[0] is not None:
            exc_text = self.formatException(record.exc_info)
        if exc_text:
            entry["exc_info"] = exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    """The given format, plus ``[task … request …]`` when the record has them."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        attrs = record.__dict__
        tags = [
            f"{label} {attrs[field]}"
            for field, label in (("task_id", "task"), ("request_id", "request"))
            if attrs.get(field) is not None
        ]
        return f"{text} [{' '.join(tags)}]" if tags else text


def configure(config: dict[str, Any]) -> None:
    """``settings.LOGGING_CONFIG``: apply ``LOGGING``, and log warnings through it as well.

    Python prints a warning (``warnings.warn``) straight to stderr, which would be the one line
    of a JSON log that is not JSON; captured, it is a record of the ``py.warnings`` logger.
    """
    logging.config.dictConfig(config)
    logging.captureWarnings(True)


# --- Celery ------------------------------------------------------------------------------------


def configure_from_settings(loglevel: int | str | None = None) -> None:
    """Apply ``settings.LOGGING``; ``loglevel`` (Celery's ``-l``) sets the root level."""
    from celery.utils.log import get_multiprocessing_logger
    from django.conf import settings

    configure(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)
    # billiard reports a pool process that died (say, OOM-killed) on its own logger, which
    # Celery would give its own handler: let it reach ours instead.
    pool_logger = get_multiprocessing_logger()
    if pool_logger is not None:
        pool_logger.propagate = True
        pool_logger.setLevel(logging.ERROR)


def _json_output() -> bool:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        return bool(settings.LOG_FORMAT == "json")
    except ImproperlyConfigured:  # no settings module: print as Celery does
        return False


def _json_line(logger_name: str, text: str) -> bytes:
    """``text`` as the JSON line a log record of ``logger_name`` would be (INFO, redacted)."""
    from queueworker.logcontext import ContextFilter
    from queueworker.redaction import RedactingFilter

    record = logging.LogRecord(logger_name, logging.INFO, "", 0, text, None, None)
    ContextFilter().filter(record)
    RedactingFilter().filter(record)
    return (JsonFormatter().format(record) + "\n").encode()


def _printing_as_json(module: str) -> Any:
    """A ``print`` for one of Celery's modules: under JSON, each call is one JSON line."""

    def print_(*args: Any, sep: str | None = " ", end: str | None = "\n", **kw: Any) -> None:
        if not _json_output():
            builtins.print(*args, sep=sep, end=end, **kw)
            return
        text = _ANSI.sub("", (sep if sep is not None else " ").join(map(str, args))).strip()
        if text:
            stream = kw.get("file") or sys.stdout
            stream.write(_json_line(module, text).decode())
            stream.flush()

    return print_


def _saying_as_json(original: Any) -> Any:
    """Celery's ``safe_say`` (shutdown notices, from a signal handler) as one JSON line."""

    def safe_say(msg: str, f: Any = sys.__stderr__) -> None:
        if not _json_output():
            original(msg, f)
            return
        try:  # like the original: a plain os.write, no locks, never raises
            os.write(f.fileno(), _json_line("celery.apps.worker", str(msg).strip()))
        except (OSError, AttributeError, ValueError):
            pass

    safe_say.qw_json = True  # type: ignore[attr-defined]
    return safe_say


def _setup_logging(loglevel: int | str | None = None, **kwargs: Any) -> None:
    # A receiver of setup_logging tells Celery not to add handlers of its own.
    configure_from_settings(loglevel)


def _worker_init(**kwargs: Any) -> None:
    # Sent before the worker's start-up checks, which warn (running as root, …) before Celery
    # sets logging up: configure it now so that those warnings are records too.
    configure_from_settings()


def connect_celery() -> None:
    """Make Celery's worker and beat log through ``settings.LOGGING`` (idempotent).

    ``setup_logging`` replaces Celery's own handlers; the banners and notices that Celery
    prints, not logs, are printed through ``_printing_as_json`` / ``_saying_as_json``, which
    under ``LOG_FORMAT=json`` write each as one JSON line and otherwise print as Celery does.
    """
    from celery import signals
    from celery.apps import beat as beat_app
    from celery.apps import worker as worker_app

    signals.setup_logging.connect(_setup_logging, weak=False, dispatch_uid="qw_setup_logging")
    signals.celeryd_init.connect(_worker_init, weak=False, dispatch_uid="qw_worker_init")
    for module in (worker_app, beat_app):
        if not hasattr(module, "print"):  # a module global shadows the builtin for the module
            module.print = _printing_as_json(module.__name__)  # type: ignore[attr-defined]
    safe_say = getattr(worker_app, "safe_say", None)  # not in celery-types' stubs
    if safe_say is not None and not getattr(safe_say, "qw_json", False):
        worker_app.safe_say = _saying_as_json(safe_say)  # type: ignore[attr-defined]
