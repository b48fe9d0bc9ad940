"""Messages that wake several tasks (``taskIds``), run by real workers: every task completes
once, a SIGKILL mid-batch re-runs only what was not recorded, cancels and retries inside a
batch behave as for a task alone."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from django.utils import timezone

from queueworker.celery import app
from queueworker.messaging import TASKS_EXCHANGE
from tasks_app.dispatch import EXECUTE_TASK
from tasks_app.models import Task, TaskLog, TaskStatus
from tests.conftest import wait_for
from tests.unit._helpers import make_task

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

S = TaskStatus
FAST_SWEEP = {"QW_SWEEP_INTERVAL_S": "0.3", "QW_DISPATCH_INTERVAL_S": "0.2"}


def _tasks(n: int, **fields: Any) -> list[Task]:
    # dispatched: the dispatcher leaves them to the message sent below
    return [
        make_task(S.PENDING, type="NOOP", dispatched_at=timezone.now(), **fields) for _ in range(n)
    ]


def _send(tasks: list[Task]) -> None:
    ids = [str(t.id) for t in tasks]
    queue = tasks[0].queue
    app.send_task(
        EXECUTE_TASK,
        kwargs={
            "taskType": "NOOP",
            "taskId": ids[0],
            "taskIds": ids,
            "delay": 0,
            "metadata": {"timeout_s": max(t.timeout_s for t in tasks), "queue": queue},
        },
        exchange=TASKS_EXCHANGE,
        queue=queue,
        routing_key=queue,
    )


def _events(task_id: Any) -> list[str]:
    return list(
        TaskLog.objects.filter(task_id=task_id)
        .order_by("created_at", "id")
        .values_list("event", flat=True)
    )


def _count(ids: list[Any], status: str) -> int:
    return Task.objects.filter(id__in=ids, status=status).count()


def test_a_message_of_many_tasks_completes_each_once(spawn):
    worker = spawn("worker")
    tasks = _tasks(60, payload={"result": 1})

    _send(tasks)

    ids = [t.id for t in tasks]
    wait_for(lambda: _count(ids, S.COMPLETED) == 60, timeout=30)
    for task in tasks:
        assert _events(task.id) == ["started", "completed"]
        assert Task.objects.get(id=task.id).result == {"ok": True, "attempt": 1, "result": 1}
    worker.wait_for_output("60 tasks in")


def test_worker_killed_mid_batch_reruns_only_what_was_not_recorded(spawn):
    # given one message of 20 tasks of 150 ms each on a single pool process
    first = spawn("worker", concurrency=1)
    tasks = _tasks(20, payload={"sleep_ms": 150}, timeout_s=5)
    ids = [t.id for t in tasks]
    _send(tasks)

    # when the worker is SIGKILLed once a few are recorded
    wait_for(lambda: _count(ids, S.COMPLETED) >= 4, timeout=30)
    first.kill(signal.SIGKILL)
    done_before = set(
        Task.objects.filter(id__in=ids, status=S.COMPLETED).values_list("id", flat=True)
    )
    spawn("worker")
    spawn("beat", **FAST_SWEEP)

    # then every task completes exactly once; those recorded before the kill never ran again
    wait_for(lambda: _count(ids, S.COMPLETED) == 20, timeout=60)
    for task in tasks:
        events = _events(task.id)
        assert events.count("completed") == 1, events
        if task.id in done_before:
            assert events == ["started", "completed"]
    assert len(done_before) < 20


def test_a_cancel_during_a_batch_stops_that_task_only(spawn, api, user):
    spawn("worker", concurrency=1)
    tasks = _tasks(8, payload={"sleep_ms": 300}, timeout_s=5, owner=user)
    ids = [t.id for t in tasks]
    _send(tasks)

    wait_for(lambda: _count(ids, S.PROCESSING) >= 1, timeout=30)
    assert api.post(f"/api/tasks/{tasks[5].id}/cancel/").status_code in (200, 202)

    wait_for(lambda: _count(ids, S.COMPLETED) + _count(ids, S.CANCELLED) == 8, timeout=30)
    assert Task.objects.get(id=tasks[5].id).status == S.CANCELLED
    assert "completed" not in _events(tasks[5].id)
    assert _count(ids, S.COMPLETED) == 7


def test_a_retry_inside_a_batch_runs_again_and_completes(spawn):
    spawn("worker")
    tasks = _tasks(5)
    flaky = make_task(S.PENDING, type="NOOP", payload={"fail_times": 1}, max_retries=3)
    batch = [tasks[0], tasks[1], flaky, *tasks[2:]]
    ids = [t.id for t in batch]

    _send(batch)

    wait_for(lambda: _count(ids, S.COMPLETED) == 6, timeout=30)
    assert _events(flaky.id) == ["started", "retry_scheduled", "started", "completed"]
    for task in tasks:
        assert _events(task.id) == ["started", "completed"]


def test_malformed_task_ids_are_refused_like_a_bad_task_id(spawn):
    from tasks_app.models import DeadLetterMessage

    worker = spawn("worker")
    (task,) = _tasks(1)
    queue = task.queue
    bad = [
        "not a list",
        [str(task.id), "not-a-uuid"],
        [str(task.id)] * 501,
        [str(t.id) for t in _tasks(2)],  # taskId is not among them
    ]
    for value in bad:
        app.send_task(
            EXECUTE_TASK,
            kwargs={"taskType": "NOOP", "taskId": str(task.id), "taskIds": value},
            exchange=TASKS_EXCHANGE,
            queue=queue,
            routing_key=queue,
        )

    # each is dead-lettered without running the task it names; the worker goes on
    wait_for(lambda: DeadLetterMessage.objects.count() >= len(bad), timeout=20)
    assert Task.objects.get(id=task.id).status == S.PENDING
    (good,) = _tasks(1)
    _send([good, *_tasks(2)])
    wait_for(lambda: Task.objects.get(id=good.id).status == S.COMPLETED, timeout=20)
    assert worker.popen.poll() is None
