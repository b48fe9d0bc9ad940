"""A message lost between commit and publish is sent again within seconds when its queue is
empty, and only after ``QW_REDISPATCH_SECONDS`` when the queue holds a backlog; a data task
waiting for batches queued behind a backlog is not judged by its lease until the queue empties."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone
from rest_framework.authtoken.models import Token

from queueworker import broker, messaging
from queueworker.celery import app
from tasks_app import liveness, recovery
from tasks_app.models import DataJob, Task, TaskLog, TaskStatus
from tests.chaos import harness
from tests.conftest import ROOT, service_env, wait_for
from tests.factories import TaskFactory
from tests.integration.test_recovery import _use_broker

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SHIPPED_DEFAULTS = {
    "QW_REDISPATCH_SECONDS": "300",
    "QW_DISPATCH_INTERVAL_S": "1",
    "QW_SWEEP_INTERVAL_S": "5",
}


@pytest.fixture
def empty_queues() -> Iterator[None]:
    harness.purge_queues()
    yield
    harness.purge_queues()


@pytest.fixture
def shipped(settings):
    settings.QW_REDISPATCH_SECONDS = 300
    settings.QW_LOST_MESSAGE_GRACE_S = 10.0


def _waiting(queue: str = messaging.DEFAULT_QUEUE, *, published_s_ago: float, **fields) -> Task:
    """A due task whose message was published ``published_s_ago`` and never reached a worker."""
    at = liveness.db_now() - timedelta(seconds=published_s_ago)
    return TaskFactory(queue=queue, next_attempt_at=at, dispatched_at=at, **fields)


def _redispatched(task: Task) -> bool:
    return TaskLog.objects.filter(task=task, event="redispatched").exists()


def _depth(queue: str) -> int:
    return harness.queue_depths()[queue]


def test_lost_message_in_an_empty_queue_is_published_again_after_the_grace(empty_queues, shipped):
    # given two tasks whose messages never reached the (empty) queue: one published 15 s ago,
    # one 5 s ago (within the grace)
    lost = _waiting(published_s_ago=15)
    recent = _waiting(published_s_ago=5)

    # when the dispatcher runs
    assert recovery.dispatch_due() == 1

    # then the older one is published again, once, and says so; the recent one waits
    lost.refresh_from_db()
    assert _redispatched(lost) and not _redispatched(recent)
    assert (timezone.now() - lost.dispatched_at).total_seconds() < 5
    wait_for(lambda: _depth(messaging.DEFAULT_QUEUE) == 1, timeout=5)
    assert recovery.dispatch_due() == 0


def test_lost_message_behind_a_backlog_waits_for_the_redispatch_window(empty_queues, shipped):
    # given a backlog in task.created (a message nobody consumes), and waiting tasks there
    # published 15 s and 301 s ago, and one in the empty http.request published 15 s ago
    harness.publish_raw([(b"{}", "application/json", {}, messaging.DEFAULT_QUEUE)])
    wait_for(lambda: _depth(messaging.DEFAULT_QUEUE) == 1, timeout=5)
    behind = _waiting(published_s_ago=15)
    overdue = _waiting(published_s_ago=301)
    elsewhere = _waiting(messaging.HTTP_QUEUE, published_s_ago=15, type="HTTP_REQUEST")

    # when the dispatcher runs
    assert recovery.dispatch_due() == 2

    # then the task behind the backlog is left to its message; the rest are published again
    assert not _redispatched(behind)
    assert _redispatched(overdue) and _redispatched(elsewhere)
    wait_for(lambda: _depth(messaging.DEFAULT_QUEUE) == 2, timeout=5)
    wait_for(lambda: _depth(messaging.HTTP_QUEUE) == 1, timeout=5)


def test_unreachable_broker_keeps_the_redispatch_window(empty_queues, shipped):
    # given a task published 15 s ago, and a broker that refuses connections
    lost = _waiting(published_s_ago=15)
    good_url = app.conf.broker_url
    _use_broker("amqp://guest:guest@127.0.0.1:1//")
    try:
        # when the dispatcher runs, then it cannot learn the queue is empty and leaves it
        assert recovery.dispatch_due() == 0
    finally:
        _use_broker(good_url)
    assert not _redispatched(lost)
    lost.refresh_from_db()
    assert lost.dispatched_at is not None


def test_broker_is_asked_only_when_a_message_may_be_lost(empty_queues, shipped, monkeypatch):
    asked: list[list[str]] = []
    real = broker.queue_stats

    def counting(names: list[str] | None = None) -> list[broker.QueueStats]:
        asked.append(list(names or []))
        return real(names)

    monkeypatch.setattr(broker, "queue_stats", counting)
    # given only a task published a moment ago, and one due later: no question
    _waiting(published_s_ago=1)
    TaskFactory(next_attempt_at=timezone.now() + timedelta(minutes=5), dispatched_at=None)
    assert recovery.dispatch_due() == 0
    assert asked == []

    # and with many suspects over several batches, one question per pass, each queue once
    for _ in range(5):
        _waiting(published_s_ago=20)
    assert recovery.dispatch_due(batch=2) == 5
    assert len(asked) == 1 and sorted(asked[0]) == sorted(harness.WORK_QUEUES)


def test_two_dispatchers_at_once_publish_each_lost_message_once(empty_queues, shipped, settings):
    # given 300 tasks whose messages were lost 20 s ago (one message per task: the queue's
    # depth then counts publications)
    settings.QW_MESSAGE_MAX_TASKS = 1
    owner = TaskFactory().owner
    Task.objects.all().delete()
    at = liveness.db_now() - timedelta(seconds=20)
    TaskFactory.create_batch(300, owner=owner, next_attempt_at=at, dispatched_at=at)

    # when two dispatchers run at once, in small batches
    published: list[int] = []
    start = threading.Barrier(2)

    def dispatch_once() -> None:
        try:
            start.wait()
            published.append(recovery.dispatch_due(batch=25))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=dispatch_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then each task was published again exactly once between them
    assert sum(published) == 300
    wait_for(lambda: _depth(messaging.DEFAULT_QUEUE) >= 300, timeout=10)
    time.sleep(0.5)
    assert _depth(messaging.DEFAULT_QUEUE) == 300
    assert TaskLog.objects.filter(event="redispatched").count() == 300


CRASHING_CREATE = """
import os, signal
from rest_framework.test import APIClient
from tasks_app import dispatch

def crash(wakeups):
    os.kill(os.getpid(), signal.SIGKILL)  # committed, about to publish: the process dies

dispatch.publish = crash
client = APIClient()
client.credentials(HTTP_AUTHORIZATION="Token " + os.environ["LOST_TOKEN"])
response = client.post("/api/tasks/", {"type": "NOOP"}, format="json")
print("survived:", response.status_code)
"""


@pytest.mark.timeout(120)
def test_crash_between_commit_and_publish_completes_within_30s_at_shipped_defaults(
    user, spawn, empty_queues
):
    # given a worker (and so a dispatcher) at the shipped redispatch, dispatch and sweep settings
    worker = spawn("worker", **SHIPPED_DEFAULTS)
    worker.wait_for_output("leads the dispatcher")

    # when an API process commits a task and is SIGKILLed before it publishes
    token = Token.objects.create(user=user).key
    crash = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", CRASHING_CREATE],
        cwd=ROOT,
        env=service_env(LOST_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=60,
    )
    crashed = time.monotonic()
    assert crash.returncode == -signal.SIGKILL, crash.stdout + crash.stderr
    task = Task.objects.get()
    assert task.status == TaskStatus.PENDING and task.dispatched_at is not None
    assert sum(harness.queue_depths().values()) == 0

    # then the dispatcher finds its queue empty, publishes it again, and it completes once
    # within 30 s (the redispatch window alone would take 300 s)
    wait_for(lambda: Task.objects.get(pk=task.pk).status == TaskStatus.COMPLETED, timeout=30)
    took = time.monotonic() - crashed
    print(f"\ncrash between commit and publish -> COMPLETED in {took:.1f} s")
    events = list(TaskLog.objects.filter(task=task).values_list("event", flat=True))
    assert events.count("completed") == 1 and events.count("redispatched") == 1


def _waiting_for_batches(*, lease_ran_out_s_ago: float) -> Task:
    """A DATA_PROCESSING task whose batches were sent: held by no process, its lease run out."""
    task = TaskFactory(
        type="DATA_PROCESSING",
        status=TaskStatus.PROCESSING,
        attempt=1,
        holder=None,
        timeout_s=30,
        lease_expires_at=liveness.db_now() - timedelta(seconds=lease_ran_out_s_ago),
    )
    DataJob.objects.create(task=task, batches=2, rows_in=40)
    return task


def test_task_waiting_for_batches_behind_a_backlog_is_not_judged(empty_queues, shipped):
    # given a data task waiting for its batches, its lease run out a second ago, while its
    # queue holds a backlog (a message nobody consumes)
    harness.publish_raw([(b"{}", "application/json", {}, messaging.DEFAULT_QUEUE)])
    wait_for(lambda: _depth(messaging.DEFAULT_QUEUE) == 1, timeout=5)
    task = _waiting_for_batches(lease_ran_out_s_ago=1)

    # when the sweep runs, then nothing is lost: its batches are queued, and its lease runs
    # again from now for as long as a merge may take
    assert recovery.expire_leases() == 0
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING and task.retries == 0
    left = (task.lease_expires_at - liveness.db_now()).total_seconds()
    assert 50 < left <= 60
    assert not TaskLog.objects.filter(task=task, event="lease_expired").exists()

    # and once the queue is empty and the lease has run out, the attempt is counted as lost
    harness.purge_queues()
    Task.objects.filter(pk=task.pk).update(
        lease_expires_at=liveness.db_now() - timedelta(seconds=1)
    )
    assert recovery.expire_leases() == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.RETRYING and task.retries == 1
    log = TaskLog.objects.get(task=task, event="lease_expired")
    assert (log.data["holder"], log.data["by"]) == (None, "lease")


def test_held_task_whose_lease_ran_out_is_judged_whatever_the_queue_holds(empty_queues, shipped):
    # given a backlog, and a task held by a process without a heartbeat whose lease ran out
    # (not one waiting for batches: the backlog says nothing about it)
    harness.publish_raw([(b"{}", "application/json", {}, messaging.DEFAULT_QUEUE)])
    wait_for(lambda: _depth(messaging.DEFAULT_QUEUE) == 1, timeout=5)
    task = TaskFactory(
        status=TaskStatus.PROCESSING,
        attempt=1,
        holder=None,
        lease_expires_at=liveness.db_now() - timedelta(seconds=1),
    )

    # when the sweep runs, then its attempt is counted as lost
    assert recovery.expire_leases() == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.RETRYING
