"""Log output: the JSON and console formatters, the log context, and Celery's output."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from typing import Any

import pytest
from celery import signals

from queueworker import logcontext
from queueworker import logging as qw_logging
from queueworker.logcontext import ContextFilter
from queueworker.logging import ConsoleFormatter, JsonFormatter
from queueworker.redaction import REDACTED, RedactingFilter, register_secret

TASK_ID = "0b0f4a52-5d43-4d0e-9a43-4d1c5f6f9a10"


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    """A logger whose one handler has the configured filters (context, redact) and formatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.logging.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- JsonFormatter -----------------------------------------------------------------------------


def test_json_line_has_the_base_fields_and_no_unknown_ones():
    logger, stream = _logger(JsonFormatter())

    logger.warning("disk %s%% full", 91)

    [entry] = _json_lines(stream)
    assert set(entry) == {"timestamp", "level", "logger", "message"}
    assert entry["level"] == "WARNING"
    assert entry["logger"] == logger.name
    assert entry["message"] == "disk 91% full"
    assert entry["timestamp"].endswith("+00:00")


def test_json_line_carries_the_bound_context_and_known_extras():
    logger, stream = _logger(JsonFormatter())

    with logcontext.bind(task_id=TASK_ID, request_id="abc-123", type="NOOP", attempt=2):
        logger.info(
            "task completed", extra={"outcome": "completed", "duration_ms": 1.5, "secret": "x"}
        )

    [entry] = _json_lines(stream)
    assert entry["task_id"] == TASK_ID
    assert entry["request_id"] == "abc-123"
    assert entry["type"] == "NOOP"
    assert entry["attempt"] == 2  # numbers stay numbers
    assert entry["outcome"] == "completed" and entry["duration_ms"] == 1.5
    assert "secret" not in entry  # an unknown extra would bypass redaction: not shown
    assert "workflow_run_id" not in entry  # unknown fields are left out, not null


def test_json_traceback_is_in_exc_info_redacted_and_the_line_stays_one_line():
    register_secret("planted-json-secret-7")
    logger, stream = _logger(JsonFormatter())

    try:
        raise RuntimeError("boom with planted-json-secret-7")
    except RuntimeError:
        logger.exception("handler failed")

    output = stream.getvalue()
    assert output.count("\n") == 1
    [entry] = _json_lines(stream)
    assert entry["message"] == "handler failed"
    assert entry["exc_info"].startswith("Traceback (most recent call last)")
    assert f"RuntimeError: boom with {REDACTED}" in entry["exc_info"]
    assert "planted-json-secret-7" not in output


def test_json_formatter_formats_a_traceback_itself_without_the_filter():
    try:
        raise ValueError("plain")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, "", 0, "failed", None, sys.exc_info())

    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: plain" in entry["exc_info"]


# --- ConsoleFormatter --------------------------------------------------------------------------


def test_console_line_shows_task_and_request_when_known():
    logger, stream = _logger(ConsoleFormatter("%(levelname)s %(name)s: %(message)s"))

    logger.info("outside")
    with logcontext.bind(task_id=TASK_ID, request_id="abc-123"):
        logger.info("inside")

    outside, inside = stream.getvalue().splitlines()
    assert outside == f"INFO {logger.name}: outside"
    assert inside == f"INFO {logger.name}: inside [task {TASK_ID} request abc-123]"


def test_the_configured_handler_has_the_context_and_redaction_filters(settings):
    assert settings.LOGGING["filters"]["context"]["()"] == "queueworker.logcontext.ContextFilter"
    assert settings.LOGGING["handlers"]["default"]["filters"] == ["context", "redact"]
    root_filters = [f for h in logging.getLogger().handlers for f in h.filters]
    assert any(isinstance(f, ContextFilter) for f in root_filters)


# --- the context -------------------------------------------------------------------------------


def _record() -> logging.LogRecord:
    record = logging.LogRecord("x", logging.INFO, "", 0, "m", None, None)
    ContextFilter().filter(record)
    return record


def test_bind_adds_fields_for_the_block_only_and_nests():
    with logcontext.bind(request_id="r1"):
        with logcontext.bind(task_id=TASK_ID, workflow_run_id=None):
            inner = _record()
        after_inner = _record()
    outside = _record()

    assert inner.request_id == "r1" and inner.task_id == TASK_ID  # type: ignore[attr-defined]
    assert not hasattr(inner, "workflow_run_id")  # None is not bound
    assert after_inner.request_id == "r1" and not hasattr(after_inner, "task_id")  # type: ignore[attr-defined]
    assert not hasattr(outside, "request_id")
    assert logcontext.current() == {}


def test_update_extends_the_enclosing_bind_and_is_undone_with_it():
    with logcontext.bind(task_id=TASK_ID):
        logcontext.update(type="NOOP", attempt=1)
        assert dict(logcontext.current()) == {"task_id": TASK_ID, "type": "NOOP", "attempt": 1}
    assert logcontext.current() == {}


def test_update_outside_any_bind_changes_nothing():
    logcontext.update(type="NOOP")
    assert logcontext.current() == {}


def test_the_context_is_not_shared_between_threads():
    seen: list[Any] = []
    with logcontext.bind(request_id="main-thread"):
        thread = threading.Thread(target=lambda: seen.append(logcontext.request_id()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_an_explicit_extra_wins_over_the_bound_field():
    logger, stream = _logger(JsonFormatter())
    with logcontext.bind(task_id=TASK_ID):
        logger.info("other task", extra={"task_id": "explicit"})
    assert _json_lines(stream)[0]["task_id"] == "explicit"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("abc-123", True),
        ("A.b_c-9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("semi;colon", False),
        ("naïve", False),
        ("line\nbreak", False),
        (None, False),
        (123, False),
    ],
)
def test_valid_request_id(value, valid):
    assert logcontext.valid_request_id(value) == (value if valid else None)


# --- Celery ------------------------------------------------------------------------------------


def test_celery_leaves_logging_to_the_settings():
    # a setup_logging receiver tells Celery to add no handlers of its own
    assert any("qw_setup_logging" in str(key) for key, _ in signals.setup_logging.receivers)


def test_celery_prints_become_json_lines_under_log_format_json(settings):
    settings.LOG_FORMAT = "json"
    out = io.StringIO()
    celery_print = qw_logging._printing_as_json("celery.apps.beat")

    celery_print("\x1b[36mcelery beat v5 is starting.\x1b[0m", file=out)
    celery_print("", file=out)  # nothing to say: nothing printed

    [entry] = _json_lines(out)
    assert entry["logger"] == "celery.apps.beat"
    assert entry["level"] == "INFO"
    assert entry["message"] == "celery beat v5 is starting."


def test_celery_prints_stay_plain_under_console(settings, capsys):
    settings.LOG_FORMAT = "console"
    qw_logging._printing_as_json("celery.apps.worker")("banner", "text")
    assert capsys.readouterr().out == "banner text\n"


def test_celery_shutdown_notice_is_one_json_line(settings, tmp_path):
    settings.LOG_FORMAT = "json"
    said: list[str] = []
    safe_say = qw_logging._saying_as_json(lambda msg, f: said.append(msg))

    with (tmp_path / "out").open("w") as out:
        safe_say("worker: Warm shutdown (MainProcess)", out)
    settings.LOG_FORMAT = "console"
    safe_say("plain", None)

    [line] = (tmp_path / "out").read_text().splitlines()
    assert json.loads(line)["message"] == "worker: Warm shutdown (MainProcess)"
    assert said == ["plain"]


def test_celery_modules_print_through_the_json_printer():
    from celery.apps import beat, worker

    qw_logging.connect_celery()  # idempotent
    for module in (worker, beat):
        assert module.print.__qualname__.startswith("_printing_as_json")  # type: ignore[attr-defined]
    assert getattr(worker.safe_say, "qw_json", False)


# --- make run's banner: Flower's login ---------------------------------------------------------


def test_banner_names_flowers_user_and_where_the_password_is_never_the_password(tmp_path):
    from tasks_app.management.commands.qw_banner import flower_login_hint

    auth_file = tmp_path / "flower-auth"
    assert flower_login_hint("", auth_file) == "set FLOWER_BASIC_AUTH=user:password"
    auth_file.write_text("admin:s3cret-generated\n")
    assert flower_login_hint("", auth_file) == f"user admin, password in {auth_file}"
    hint = flower_login_hint("ops:given-pw,other:pw2", auth_file)
    assert hint == "user ops, password from FLOWER_BASIC_AUTH"
    assert "s3cret" not in hint and "given-pw" not in hint
