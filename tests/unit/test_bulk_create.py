"""Bulk create's one-pass validation and COPY insert: same answers as the item serializer."""

from __future__ import annotations

import pytest

from tasks_app.api.serializers import _plain_item
from tasks_app.models import Task, TaskLog

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "item",
    [
        {"type": "NOOP", "priority": True},  # a boolean is no number here
        {"type": "NOOP", "priority": 3.0},
        {"type": "NOOP", "priority": "3"},
        {"type": " NOOP"},
        {"type": "NOPE"},
        {"type": "NOOP", "payload": None},
        {"type": "NOOP", "retry_jitter": "yes"},
        {"type": "NOOP", "retry_backoff_s": float("nan")},
        {"type": "NOOP", "scheduled_at": "2030-01-01T00:00:00Z"},
        {"type": "NOOP", "idempotency_key": "k"},
        {"type": "NOOP", "extra": 1},
        ["NOOP"],
    ],
)
def test_anything_but_the_plain_form_is_left_to_the_serializer(item):
    assert _plain_item(item) is None


def test_the_plain_form_is_taken_as_is():
    item = {
        "type": "NOOP",
        "payload": {"sleep_ms": 1},
        "priority": 9,
        "max_retries": 0,
        "timeout_s": 5,
        "delay_ms": None,
        "retry_backoff_s": 1,
        "retry_jitter": False,
    }

    plain = _plain_item(item)

    assert plain is not None
    assert plain["retry_backoff_s"] == 1.0 and isinstance(plain["retry_backoff_s"], float)
    assert plain["priority"] == 9 and plain["retry_jitter"] is False


def test_bulk_writes_rows_like_a_single_create(api, user):
    items = [
        {"type": "NOOP", "priority": 3, "payload": {"sleep_ms": 1}},
        {"type": "NOOP", "priority": "4"},  # coerced by the serializer, as before
        {"type": "NOOP", "delay_ms": 60_000, "retry_backoff_s": 2},
    ]

    response = api.post("/api/tasks/bulk/", {"tasks": items}, format="json")

    assert response.status_code == 201, response.content
    ids = response.json()["ids"]
    tasks = {str(t.id): t for t in Task.objects.filter(pk__in=ids)}
    first, second, third = (tasks[i] for i in ids)
    assert (first.priority, first.payload, first.owner_id) == (3, {"sleep_ms": 1}, user.id)
    assert second.priority == 4 and second.payload == {}
    assert third.dispatched_at is None and third.retry_backoff_s == 2.0
    assert first.dispatched_at is not None and first.created_at is not None
    logs = TaskLog.objects.filter(task_id__in=ids, event="created")
    assert sorted(str(log.task_id) for log in logs) == sorted(ids)
    assert all(log.data["by"] == user.get_username() for log in logs)


def test_every_bad_item_is_named_and_nothing_is_written(api):
    items = [{"type": "NOOP"}] * 20
    items[3] = {"type": "NOOP", "payload": {"sleep_ms": -1}}
    items[17] = {"type": "NOOP", "priority": 10}

    response = api.post("/api/tasks/bulk/", {"tasks": items}, format="json")

    assert response.status_code == 400
    errors = response.json()["tasks"]
    assert set(errors) == {"3", "17"}
    assert "sleep_ms" in errors["3"]["payload"]
    assert "priority" in errors["17"]
    assert Task.objects.count() == 0 and TaskLog.objects.count() == 0


# --- single create: the task and its log row in one statement ---------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_single_create_outside_a_transaction_writes_task_and_log_in_one_statement(api, user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        response = api.post(
            "/api/tasks/", {"type": "NOOP", "payload": {"sleep_ms": 1}}, format="json"
        )

    assert response.status_code == 201, response.content
    inserts = [q["sql"] for q in queries.captured_queries if "INSERT" in q["sql"]]
    assert len(inserts) == 1 and inserts[0].startswith("WITH t AS (INSERT")
    task = Task.objects.get(pk=response.json()["id"])
    assert (task.owner_id, task.payload, task.status) == (user.id, {"sleep_ms": 1}, "PENDING")
    log = TaskLog.objects.get(task=task)
    assert log.event == "created" and log.data["by"] == user.get_username()
    assert log.level == "INFO" and log.created_at is not None


@pytest.mark.django_db(transaction=True)
def test_the_same_key_in_one_statement_path_returns_the_first_task(api):
    body = {"type": "NOOP", "idempotency_key": "once"}

    first = api.post("/api/tasks/", body, format="json")
    again = api.post("/api/tasks/", body, format="json")

    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert Task.objects.count() == 1 and TaskLog.objects.count() == 1
