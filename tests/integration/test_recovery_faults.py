"""Recovery at the shipped defaults with 300 HTTP tasks in flight, under three faults.

Each test runs two prefork workers against a slow loopback endpoint (every call takes 0.5 to
1 s), injects one fault while the pools are busy, and then requires every task COMPLETED
within 120 s of the fault with exactly one ``completed`` log event each. The lease, sweep,
dispatch and redispatch intervals, the backoff and the task's ``timeout_s`` are the shipped
defaults, so the printed fault-to-last-completion time is what a deployment gets.

The faults touch only what the session owns: a worker this test started (SIGKILL of its
whole process group, not restarted: the survivor alone must finish the work), the
connections of the session's RabbitMQ vhost, and the backends of the session's database.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from django.db.models import Count, Max
from django.utils import timezone

from tasks_app.http.testing import LoopbackServer, Received, Reply
from tasks_app.models import DispatcherLease, Task, TaskLog, TaskStatus
from tests.chaos import harness
from tests.conftest import Proc, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TASKS = 300
WORKERS = 2
# Four pool processes per worker: eight calls run at once, so a fault meets many of them.
CONCURRENCY = 4
RECOVERY_BOUND_S = 120.0
# The fixtures shorten the lease and the backoff for the rest of the suite; these are the
# shipped values. The sweep, dispatch and redispatch intervals are left unset (their defaults).
SHIPPED = {"QW_LEASE_SECONDS": "30", "QW_BACKOFF_BASE_S": "2.0", "QW_BACKOFF_CAP_S": "600.0"}
LEFT_AT_DEFAULT = ("QW_SWEEP_INTERVAL_S", "QW_DISPATCH_INTERVAL_S", "QW_REDISPATCH_SECONDS")
DEFAULT_TIMEOUT_S = 300


def _slow_reply(received: Received) -> Reply:
    """Each call answers after 0.5 to 1 s, the same for the same task (its ``n`` parameter)."""
    n = int(received.query.get("n", ["0"])[0])
    return Reply(json={"n": n}, delay_s=random.Random(n).uniform(0.5, 1.0))


@pytest.fixture
def server(settings: Any) -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        srv.script("/slow", _slow_reply)
        settings.QW_HTTP_ALLOWED_HOSTS = [srv.netloc]  # the create-time check, in this process
        yield srv


@pytest.fixture
def workers(spawn: Callable[..., Proc], server: LoopbackServer) -> list[Proc]:
    """Two workers at the shipped defaults, on empty queues."""
    assert not set(LEFT_AT_DEFAULT) & os.environ.keys(), "run with the shipped defaults"
    harness.purge_queues()  # an earlier test's messages would name flushed rows
    return [
        spawn("worker", concurrency=CONCURRENCY, QW_HTTP_ALLOWED_HOSTS=server.netloc, **SHIPPED)
        for _ in range(WORKERS)
    ]


def _create_tasks(api: Any, server: LoopbackServer) -> list[str]:
    ids = []
    for n in range(TASKS):
        body = {"type": "HTTP_REQUEST", "payload": {"url": server.url("/slow"), "params": {"n": n}}}
        response = api.post("/api/tasks/", body, format="json")
        assert response.status_code == 201, response.content
        ids.append(response.json()["id"])
    assert set(Task.objects.filter(pk__in=ids).values_list("timeout_s", flat=True)) == {
        DEFAULT_TIMEOUT_S
    }
    return ids


def _counts(ids: list[str]) -> dict[str, int]:
    rows = Task.objects.filter(pk__in=ids).values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def _wait_until_busy(ids: list[str]) -> dict[str, int]:
    """Until every pool process runs a call and a fifth of the work is done: mid-run."""

    def busy() -> dict[str, int] | None:
        counts = _counts(ids)
        running = counts.get(TaskStatus.PROCESSING, 0)
        done = counts.get(TaskStatus.COMPLETED, 0)
        return counts if running >= WORKERS * CONCURRENCY - 1 and done >= TASKS // 5 else None

    counts: dict[str, int] = wait_for(busy, timeout=90, interval=0.05)
    return counts


def _evidence(ids: list[str], limit: int = 10) -> str:
    """The unfinished tasks with their logs, for the failure message."""
    lines = [f"by status: {_counts(ids)}"]
    stuck = Task.objects.filter(pk__in=ids).exclude(status=TaskStatus.COMPLETED)
    for task in stuck.order_by("created_at")[:limit]:
        lines.append(
            f"task {task.pk} {task.status} attempt={task.attempt} retries={task.retries} "
            f"holder={task.holder} lease_expires_at={task.lease_expires_at} "
            f"next_attempt_at={task.next_attempt_at} error={task.error!r}"
        )
        for log in TaskLog.objects.filter(task_id=task.pk).order_by("created_at", "id"):
            lines.append(f"    {log.created_at:%H:%M:%S.%f} {log.event}: {log.message}")
    return "\n".join(lines)


def _all_complete_within_bound(
    ids: list[str], fault_at: datetime, fault: str, server: LoopbackServer
) -> float:
    """Wait for every task to complete; check one ``completed`` event each; print and return
    the seconds from the fault to the last completion."""
    while _counts(ids).get(TaskStatus.COMPLETED, 0) < TASKS:
        if (timezone.now() - fault_at).total_seconds() > RECOVERY_BOUND_S:
            pytest.fail(
                f"{fault}: not every task COMPLETED within {RECOVERY_BOUND_S:.0f} s\n"
                + _evidence(ids)
            )
        time.sleep(0.2)
    last = Task.objects.filter(pk__in=ids).aggregate(last=Max("finished_at"))["last"]
    took = (last - fault_at).total_seconds()
    print(
        f"\n{fault}: fault -> last completion {took:.1f} s; {_recovery_summary(ids, fault_at)}; "
        f"HTTP calls made {len(server.received('/slow'))} for {TASKS} tasks"
    )
    assert took <= RECOVERY_BOUND_S, (took, _evidence(ids))

    completions = dict(
        TaskLog.objects.filter(task_id__in=ids, event="completed")
        .values("task_id")
        .annotate(n=Count("id"))
        .values_list("task_id", "n")
    )
    wrong = {
        str(t): completions.get(t, 0)
        for t in Task.objects.filter(pk__in=ids).values_list("pk", flat=True)
        if completions.get(t, 0) != 1
    }
    assert not wrong, f"tasks without exactly one 'completed' event: {wrong}"
    return took


def _recovery_summary(ids: list[str], fault_at: datetime) -> str:
    """What recovery took: events beyond created/started/completed, and repeated attempts."""
    usual = ("created", "started", "completed")
    events = dict(
        TaskLog.objects.filter(task_id__in=ids)
        .exclude(event__in=usual)
        .values("event")
        .annotate(n=Count("id"))
        .values_list("event", "n")
    )
    again = Task.objects.filter(pk__in=ids, attempt__gt=1)
    summary = f"other events {events}, tasks run more than once {again.count()}"
    last = again.aggregate(last=Max("finished_at"))["last"]
    if last is not None:
        summary += f" (the last of them completed {(last - fault_at).total_seconds():.1f} s in)"
    return summary


def _report_in_flight(fault: str, counts: dict[str, int]) -> None:
    print(f"\n{fault}: at the fault {counts}")


def _leader(workers: list[Proc]) -> Proc:
    """The worker whose main process leads the dispatcher (it also runs the sweep)."""

    def holder() -> str:
        lease = DispatcherLease.objects.filter(expires_at__gt=timezone.now()).first()
        return lease.holder if lease is not None else ""

    identity = wait_for(holder, timeout=30)
    return next(w for w in workers if f" pid {w.popen.pid} " in identity)


@pytest.mark.timeout(300)
def test_worker_sigkilled_with_300_http_tasks_in_flight_all_complete_once(api, server, workers):
    # given 300 slow HTTP tasks running on two workers
    ids = _create_tasks(api, server)
    victim = _leader(workers)
    counts = _wait_until_busy(ids)

    # when the worker that also leads the dispatcher is SIGKILLed with its pool, and not
    # restarted
    fault_at = timezone.now()
    victim.kill(signal.SIGKILL)
    _report_in_flight("SIGKILL of a whole worker", counts)

    # then the survivor completes every task, each once, within 120 s
    _all_complete_within_bound(ids, fault_at, "SIGKILL of a whole worker", server)
    recovered = TaskLog.objects.filter(task_id__in=ids, event="lease_expired").count()
    print(f"tasks recovered from the killed worker: {recovered}")
    assert recovered >= 1  # the fault met running calls: some attempts were lost


@pytest.mark.timeout(300)
def test_broker_connections_closed_with_300_http_tasks_in_flight_all_complete_once(
    api, server, workers
):
    # given 300 slow HTTP tasks running on two workers
    ids = _create_tasks(api, server)
    counts = _wait_until_busy(ids)

    # when RabbitMQ closes every connection of the session's vhost
    fault_at = timezone.now()
    closed = harness.close_broker_connections("recovery test: broker connections closed")
    _report_in_flight(f"close_all_connections ({closed} closed)", counts)
    assert closed >= WORKERS

    # then every task completes, each once, within 120 s
    _all_complete_within_bound(ids, fault_at, "rabbitmqctl close_all_connections", server)


@pytest.mark.timeout(300)
def test_database_backends_terminated_with_300_http_tasks_in_flight_all_complete_once(
    api, server, workers
):
    # given 300 slow HTTP tasks running on two workers
    ids = _create_tasks(api, server)
    counts = _wait_until_busy(ids)

    # when PostgreSQL terminates every other backend of the test database
    fault_at = timezone.now()
    terminated = harness.terminate_backends()
    _report_in_flight(f"pg_terminate_backend ({terminated} backends)", counts)
    assert terminated >= WORKERS

    # then every task completes, each once, within 120 s
    _all_complete_within_bound(ids, fault_at, "pg_terminate_backend", server)
