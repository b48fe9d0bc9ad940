"""Nothing accepted is lost: dead workers, lost messages and a broker outage."""

from __future__ import annotations

import os
import signal
import time

import pytest
from kombu import pools

from queueworker.celery import app
from tasks_app import dispatch
from tasks_app.models import Task, TaskLog, TaskStatus, WorkerHeartbeat
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
    assert _status(task_id) == TaskStatus.PENDING

    # when a worker starts, and its dispatcher sees the task still waiting after the window
    # (how long the worker takes to start on a loaded machine decides which window applies)
    spawn("worker", QW_REDISPATCH_SECONDS="3", **FAST_SWEEP)

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


# --- liveness: heartbeats bound recovery, not the task's time limit ---------------------------


def _completed_within(task_id: str, timeout: float) -> float:
    """Seconds until the task is COMPLETED (fails after ``timeout``)."""
    started = time.monotonic()
    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED, timeout=timeout, interval=0.2)
    return time.monotonic() - started


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["whole worker", "pool child"])
def test_worker_killed_mid_task_with_default_lease_and_timeout_recovers_within_60s(
    api, spawn, target
):
    # given the default lease (30 s) and sweep (5 s), two workers, and a NOOP with the default
    # timeout_s (300) running on one of them
    defaults = {"QW_LEASE_SECONDS": "30"}
    workers = [spawn("worker", concurrency=1, **defaults) for _ in range(2)]
    body = {"type": "NOOP", "payload": {"sleep_ms": 4000}}
    task_id = api.post("/api/tasks/", body, format="json").json()["id"]
    wait_for(lambda: _status(task_id) == TaskStatus.PROCESSING)
    task = Task.objects.get(pk=task_id)
    assert task.timeout_s == 300
    child = WorkerHeartbeat.objects.get(pk=task.holder).pid

    # when the worker running it (or only its pool child) is SIGKILLed
    if target == "whole worker":
        next(w for w in workers if child in w.children()).kill(signal.SIGKILL)
    else:
        os.kill(child, signal.SIGKILL)

    # then the task is recovered by its missing heartbeat and completes once within 60 s
    # (the backstop lease would have taken 300 + 10 + 30 s)
    took = _completed_within(task_id, timeout=60)
    print(f"\nSIGKILL ({target}) -> COMPLETED in {took:.1f} s")
    events = _events(task_id)
    assert events.count("completed") == 1 and "lease_expired" in events
    lost = TaskLog.objects.get(task_id=task_id, event="lease_expired")
    assert "stopped sending heartbeats" in lost.message
    task = Task.objects.get(pk=task_id)
    assert task.retries == 1 and task.attempt == 2


@pytest.mark.timeout(120)
def test_busy_worker_running_longer_than_the_lease_is_not_declared_lost(api, spawn):
    # given a 2 s lease, a sweep every 0.3 s, and a worker whose tasks each run 6 s
    spawn("worker", concurrency=2, QW_LEASE_SECONDS="2", **FAST_SWEEP)
    time.sleep(2.5)  # the sweep has reached the database for a whole lease: it judges
    body = {"type": "NOOP", "payload": {"sleep_ms": 6000}}
    ids = [api.post("/api/tasks/", body, format="json").json()["id"] for _ in range(2)]

    # when they run three leases long
    for task_id in ids:
        _completed_within(task_id, timeout=30)

    # then neither was declared lost: the heartbeats went on while the handlers slept
    for task_id in ids:
        task = Task.objects.get(pk=task_id)
        assert (task.attempt, task.retries) == (1, 0)
        assert "lease_expired" not in _events(task_id)


@pytest.mark.timeout(120)
def test_without_beat_delayed_work_runs_and_a_crashed_worker_is_recovered(api, spawn):
    # given workers and a beat that is SIGKILLed and never restarted
    worker = spawn("worker", concurrency=2, **FAST_SWEEP)
    beat = spawn("beat", **FAST_SWEEP)
    time.sleep(1.0)
    beat.kill(signal.SIGKILL)

    # when a task is delayed 3 s, and another's pool child is SIGKILLed mid-task
    delayed = api.post("/api/tasks/", {"type": "NOOP", "delay_ms": 3000}, format="json").json()
    slow = api.post(
        "/api/tasks/", {"type": "NOOP", "payload": {"sleep_ms": 3000}}, format="json"
    ).json()
    wait_for(lambda: _status(slow["id"]) == TaskStatus.PROCESSING)
    holder = Task.objects.get(pk=slow["id"]).holder
    os.kill(WorkerHeartbeat.objects.get(pk=holder).pid, signal.SIGKILL)

    # then the dispatcher in the worker publishes the first when due and recovers the second
    _completed_within(delayed["id"], timeout=20)
    task = Task.objects.get(pk=delayed["id"])
    assert (task.started_at - task.created_at).total_seconds() >= 2.9
    _completed_within(slow["id"], timeout=30)
    assert "lease_expired" in _events(slow["id"])
    assert "leads the dispatcher" in worker.output()


@pytest.mark.timeout(180)
def test_database_outage_longer_than_the_lease_completes_tasks_once_without_a_lease(
    api, spawn, tmp_path
):
    from tests.chaos import harness
    from tests.integration import handlers

    services = harness.Services(tmp_path)
    try:
        # given a worker (its dispatcher too) that reaches PostgreSQL through a proxy, a 3 s
        # lease, two tasks that finish during the outage and one that runs through it (their
        # handler sleeps without the database, so only their outcome meets the outage)
        proxy = services.proxy(harness.database_url())
        database = harness.via_proxy(harness.database_url(), proxy)
        lease = 3
        spawn(
            "worker",
            concurrency=3,
            DATABASE_URL=database,
            QW_LEASE_SECONDS=str(lease),
            QW_HANDLER_MODULES="tests.integration.handlers",
            **FAST_SWEEP,
        )
        time.sleep(lease + 0.5)
        sleeps = [2500, 2500, 14000]
        ids = [
            api.post(
                "/api/tasks/", {"type": handlers.SLEEP, "payload": {"sleep_ms": ms}}, format="json"
            ).json()["id"]
            for ms in sleeps
        ]
        wait_for(lambda: all(_status(i) == TaskStatus.PROCESSING for i in ids))

        # when PostgreSQL is unreachable for 8 s (over twice the lease)
        proxy.off()
        time.sleep(8)
        assert all(_status(i) == TaskStatus.PROCESSING for i in ids)
        proxy.on()
        back = time.monotonic()

        # then the two whose completion failed record it as soon as the database is back
        for task_id in ids[:2]:
            wait_for(lambda t=task_id: _status(t) == TaskStatus.COMPLETED, timeout=lease)
        print(f"\ncompletions recorded {time.monotonic() - back:.1f} s after the outage")
        # and the one still running was not declared lost: it completes on its first attempt
        _completed_within(ids[2], timeout=30)
        for task_id in ids:
            events = _events(task_id)
            assert events.count("completed") == 1, events
            assert "lease_expired" not in events, events
            assert Task.objects.get(pk=task_id).attempt == 1
    finally:
        services.stop_all()
