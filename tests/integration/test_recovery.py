"""Nothing accepted is lost: dead workers, lost messages and a broker outage (DESIGN §6)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from kombu import pools

from queueworker.celery import app
from tasks_app import dispatch
from tasks_app.models import Task, TaskLog, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FAST_SWEEP = {"QW_SWEEP_INTERVAL_S": "0.3", "QW_DISPATCH_INTERVAL_S": "0.2"}


def _status(task_id: str) -> str:
    return Task.objects.get(pk=task_id).status


def _events(task_id: str) -> list[str]:
    return list(
        TaskLog.objects.filter(task_id=task_id)
        .order_by("created_at", "id")
        .values_list("event", flat=True)
    )


@pytest.mark.parametrize("target", ["whole worker", "pool child"])
def test_worker_killed_mid_task_the_task_still_completes_once(api, spawn, target):
    # given a worker running a slow task
    first = spawn("worker", concurrency=1)
    body = {"type": "NOOP", "payload": {"sleep_ms": 1500}, "timeout_s": 3}
    task_id = api.post("/api/tasks/", body, format="json").json()["id"]
    wait_for(lambda: _status(task_id) == TaskStatus.PROCESSING)

    # when the worker (or only the child running the task) is SIGKILLed mid-task
    if target == "whole worker":
        first.kill(signal.SIGKILL)
    else:
        for pid in first.children():
            os.kill(pid, signal.SIGKILL)
    spawn("worker")
    spawn("beat", **FAST_SWEEP)

    # then the lease expires, the sweep counts a lost attempt, and the task completes once
    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=30)
    events = _events(task_id)
    assert events.count("completed") == 1
    assert "lease_expired" in events
    task = Task.objects.get(pk=task_id)
    assert task.retries == 1 and task.attempt == 2


def test_message_lost_between_commit_and_publish_is_delivered_by_the_sweep(api, spawn, monkeypatch):
    # given a task committed whose message never reached the broker (a crash before publish)
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: 0)
    task_id = api.post("/api/tasks/", {"type": "NOOP"}, format="json").json()["id"]
    monkeypatch.undo()
    spawn("worker", QW_REDISPATCH_SECONDS="3", **FAST_SWEEP)
    time.sleep(1.5)
    assert _status(task_id) == TaskStatus.PENDING

    # when the dispatcher (in the worker) sees it still waiting after the redispatch window

    # then the task is published again and completes
    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=20)
    assert "redispatched" in _events(task_id)


def _use_broker(url: str) -> None:
    # Celery reads CELERY_BROKER_URL from the environment before its own configuration.
    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = url
    pools.reset()  # kombu keeps connection and producer pools per URL, process-wide
    app._pool = None
    app.amqp._producer_pool = None
    dispatch.reset_breaker()


def test_create_with_the_broker_down_answers_201_fast_and_delivers_later(api, spawn):
    # given a broker that refuses connections
    good_url = app.conf.broker_url
    _use_broker("amqp://guest:guest@127.0.0.1:1//")
    try:
        # when tasks are created
        timings, ids = [], []
        for _ in range(3):
            started = time.monotonic()
            response = api.post("/api/tasks/", {"type": "NOOP"}, format="json")
            timings.append(time.monotonic() - started)
            assert response.status_code == 201
            ids.append(response.json()["id"])
    finally:
        _use_broker(good_url)

    # then each answered within 2 s and is stored, waiting for the dispatcher
    assert max(timings) < 2.0, timings
    assert Task.objects.filter(pk__in=ids, dispatched_at__isnull=True).count() == 3
    assert api.get(f"/api/tasks/{ids[0]}/").json()["wait_reason"]["code"] == "awaiting_dispatch"

    # and once the broker is back, the dispatcher delivers every one of them
    spawn("worker")
    spawn("beat", **FAST_SWEEP)
    wait_for(lambda: Task.objects.filter(pk__in=ids, status=TaskStatus.COMPLETED).count() == 3)


def test_delayed_task_waits_in_the_database_and_runs_when_due(api, spawn):
    spawn("worker")
    spawn("beat", **FAST_SWEEP)
    started = time.monotonic()
    task_id = api.post("/api/tasks/", {"type": "NOOP", "delay_ms": 1500}, format="json").json()[
        "id"
    ]
    assert Task.objects.get(pk=task_id).dispatched_at is None

    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=15)

    task = Task.objects.get(pk=task_id)
    assert (task.started_at - task.created_at).total_seconds() >= 1.4
    assert time.monotonic() - started >= 1.4
