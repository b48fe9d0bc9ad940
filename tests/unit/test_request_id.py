"""Request ids: taken or made by the middleware, returned, and carried into the tasks created.

Publishing is recorded instead of sent (``app.send_task`` replaced, as in test_api_tasks.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory
from rest_framework.test import APIClient

from queueworker import logcontext
from queueworker.middleware import RequestIdMiddleware
from tasks_app import dispatch
from tasks_app.models import TaskLog
from tasks_app.tasks import execute_task
from tests.unit._helpers import make_task

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append({"name": name, "kwargs": kwargs, **options})

    monkeypatch.setattr(dispatch.app, "send_task", send_task)
    monkeypatch.setattr(
        dispatch.app, "producer_or_acquire", lambda producer=None: contextlib.nullcontext(None)
    )
    dispatch.reset_breaker()
    yield calls
    dispatch.reset_breaker()


# --- the middleware ----------------------------------------------------------------------------


def _through_middleware(**headers: str) -> tuple[HttpResponse, list[str | None]]:
    seen: list[str | None] = []

    def view(request: HttpRequest) -> HttpResponse:
        seen.append(logcontext.request_id())
        return HttpResponse("ok")

    request = RequestFactory().get("/anything/", headers=headers)
    return RequestIdMiddleware(view)(request), seen


def test_a_valid_header_is_taken_bound_and_returned():
    response, seen = _through_middleware(**{"X-Request-ID": "abc-123.X_9"})

    assert response["X-Request-ID"] == "abc-123.X_9"
    assert seen == ["abc-123.X_9"]
    assert logcontext.request_id() is None  # unbound once the request is done


@pytest.mark.parametrize("given", ["x" * 129, "has space", "a;b", "naïve", "<script>"])
def test_an_invalid_header_is_replaced_by_a_new_id(given):
    response, seen = _through_middleware(**{"X-Request-ID": given})

    assert GENERATED.fullmatch(response["X-Request-ID"])
    assert seen == [response["X-Request-ID"]]


def test_without_a_header_an_id_is_made_per_request():
    first, seen_first = _through_middleware()
    second, _ = _through_middleware()

    assert GENERATED.fullmatch(first["X-Request-ID"])
    assert seen_first == [first["X-Request-ID"]]
    assert first["X-Request-ID"] != second["X-Request-ID"]


@pytest.mark.django_db
def test_every_api_response_carries_the_id_even_a_refused_one(api):
    assert api.get("/api/tasks/", HTTP_X_REQUEST_ID="list-1")["X-Request-ID"] == "list-1"
    refused = api.post("/api/tasks/", {"type": "NOPE"}, format="json", HTTP_X_REQUEST_ID="bad-1")
    assert refused.status_code == 400 and refused["X-Request-ID"] == "bad-1"
    anonymous = APIClient().get("/api/tasks/")
    assert anonymous.status_code == 401 and GENERATED.fullmatch(anonymous["X-Request-ID"])


def test_the_request_logs_carry_the_id():
    logger = logging.getLogger("test.request_id")

    def view(request: HttpRequest) -> HttpResponse:
        logger.warning("inside the view")
        return HttpResponse("ok")

    handler_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.addFilter(logcontext.ContextFilter())
    handler.emit = handler_records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        RequestIdMiddleware(view)(RequestFactory().get("/", headers={"X-Request-ID": "log-1"}))
    finally:
        logger.removeHandler(handler)

    [record] = handler_records
    assert record.request_id == "log-1"  # type: ignore[attr-defined]


# --- into the tasks it creates -----------------------------------------------------------------


@pytest.mark.django_db
def test_create_records_the_request_id_in_the_created_row_and_the_message(
    api, sent, django_capture_on_commit_callbacks
):
    # given a request with an id
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(
            "/api/tasks/",
            {"type": "NOOP", "payload": {}},
            format="json",
            HTTP_X_REQUEST_ID="abc-123",
        )

    # then the task's "created" row keeps it, and its wake-up message carries it
    assert response.status_code == 201, response.content
    assert response["X-Request-ID"] == "abc-123"
    task_id = response.json()["id"]
    created = TaskLog.objects.get(task_id=task_id, event="created")
    assert created.data["request_id"] == "abc-123"
    [message] = sent
    assert message["kwargs"]["taskId"] == task_id
    assert message["kwargs"]["metadata"]["request_id"] == "abc-123"
    assert set(message["kwargs"]["metadata"]) == {"timeout_s", "queue", "request_id"}


@pytest.mark.django_db
def test_a_generated_id_is_the_one_recorded(api, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/tasks/", {"type": "NOOP", "payload": {}}, format="json")

    generated = response["X-Request-ID"]
    assert GENERATED.fullmatch(generated)
    created = TaskLog.objects.get(task_id=response.json()["id"], event="created")
    assert created.data["request_id"] == generated
    assert sent[0]["kwargs"]["metadata"]["request_id"] == generated


@pytest.mark.django_db
def test_bulk_create_records_the_id_for_every_task(api, sent, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(
            "/api/tasks/bulk/",
            {"tasks": [{"type": "NOOP", "payload": {}}] * 3},
            format="json",
            HTTP_X_REQUEST_ID="bulk-7",
        )

    assert response.status_code == 201, response.content
    rows = TaskLog.objects.filter(task_id__in=response.json()["ids"], event="created")
    assert [row.data["request_id"] for row in rows] == ["bulk-7"] * 3
    # one message for the three (same type, queue and priority), carrying the shared id
    assert [m["kwargs"]["metadata"]["request_id"] for m in sent] == ["bulk-7"]
    assert sent[0]["kwargs"]["taskIds"] == response.json()["ids"]


@pytest.mark.django_db
def test_a_workflow_runs_first_step_records_the_id(api, sent, django_capture_on_commit_callbacks):
    definition = {"start": "a", "steps": {"a": {"type": "NOOP", "payload": {}}}}
    workflow = api.post("/api/workflows/", {"name": "w", "definition": definition}, format="json")
    assert workflow.status_code == 201, workflow.content

    with django_capture_on_commit_callbacks(execute=True):
        run = api.post(
            f"/api/workflows/{workflow.json()['id']}/runs/",
            {"input": {}},
            format="json",
            HTTP_X_REQUEST_ID="run-1",
        )

    assert run.status_code == 201, run.content
    step_task = run.json()["steps"][0]["task"]
    assert TaskLog.objects.get(task_id=step_task, event="created").data["request_id"] == "run-1"
    assert [m["kwargs"]["metadata"]["request_id"] for m in sent] == ["run-1"]


@pytest.mark.django_db
def test_outside_a_request_nothing_is_recorded(sent):
    # the dispatcher and the sweep (in beat) republish without any request
    task = make_task()
    dispatch.publish([dispatch.wakeup_for(task)])

    [message] = sent
    assert "request_id" not in message["kwargs"]["metadata"]


# --- in the worker -----------------------------------------------------------------------------


@pytest.fixture
def task_records() -> Iterator[list[logging.LogRecord]]:
    """What ``tasks_app.tasks`` logs, with the context the configured filter adds."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.addFilter(logcontext.ContextFilter())
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tasks_app.tasks")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.setLevel(previous)
    logger.removeHandler(handler)


@pytest.mark.django_db(transaction=True)
def test_the_worker_logs_one_line_per_task_with_its_context(sent, task_records):
    # given a task whose message carries a request id
    task = make_task(type="NOOP", payload={})

    # when the worker runs it
    status = execute_task(
        taskType="NOOP",
        taskId=str(task.id),
        metadata={"timeout_s": 30, "queue": "task.created", "request_id": "abc-123"},
    )

    # then one line says how it ended, with the task's context
    assert status == "completed"
    [record] = task_records
    fields = record.__dict__
    assert record.levelno == logging.INFO
    assert fields["task_id"] == str(task.id)
    assert fields["request_id"] == "abc-123"
    assert fields["type"] == "NOOP"
    assert fields["attempt"] == 1
    assert fields["outcome"] == "completed"
    assert fields["duration_ms"] >= 0
    assert "workflow_run_id" not in fields
    assert logcontext.current() == {}  # nothing left bound after the task


@pytest.mark.django_db(transaction=True)
def test_the_worker_ignores_a_missing_or_invalid_request_id(sent, task_records):
    first, second = make_task(type="NOOP", payload={}), make_task(type="NOOP", payload={})

    execute_task(taskType="NOOP", taskId=str(first.id), metadata={"timeout_s": 30})
    execute_task(taskType="NOOP", taskId=str(second.id), metadata={"request_id": "bad id\n"})

    assert [r.__dict__.get("request_id") for r in task_records] == [None, None]
    assert [r.__dict__["task_id"] for r in task_records] == [str(first.id), str(second.id)]


@pytest.mark.django_db(transaction=True)
def test_a_retry_message_keeps_the_request_id(sent, task_records):
    # given a task that fails its first attempt with a retryable error
    task = make_task(type="NOOP", payload={"fail_times": 1}, max_retries=2)

    status = execute_task(
        taskType="NOOP", taskId=str(task.id), metadata={"timeout_s": 30, "request_id": "r-9"}
    )

    # then the countdown message that wakes the retry carries the same request id
    assert status == "retrying"
    [message] = sent
    assert message["kwargs"]["metadata"]["request_id"] == "r-9"
