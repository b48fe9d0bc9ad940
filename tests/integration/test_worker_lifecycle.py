"""A task submitted over the API runs on a real Celery worker over RabbitMQ and PostgreSQL."""

from __future__ import annotations

import os

import pytest

from tasks_app.models import Task, TaskLog, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _status(task_id: str) -> str:
    return Task.objects.get(pk=task_id).status


def test_task_completes_with_its_logs(api, worker):
    response = api.post("/api/tasks/", {"type": "NOOP", "payload": {"result": 7}}, format="json")
    assert response.status_code == 201, response.content
    task_id = response.json()["id"]

    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED)

    task = api.get(f"/api/tasks/{task_id}/").json()
    assert task["result"] == {"ok": True, "attempt": 1, "result": 7}
    assert task["started_at"] and task["finished_at"]
    events = [log["event"] for log in api.get(f"/api/tasks/{task_id}/logs/").json()]
    assert events == ["created", "started", "completed"]


def _logs(task_id: str) -> list[TaskLog]:
    return list(TaskLog.objects.filter(task_id=task_id).order_by("created_at", "id"))


def test_task_failing_twice_then_succeeding_retries_with_growing_gaps(api, worker):
    # given a task that fails its first two attempts, with a fixed (un-jittered) backoff
    body = {
        "type": "NOOP",
        "payload": {"fail_times": 2},
        "retry_backoff_s": 0.3,
        "retry_jitter": False,
    }
    task_id = api.post("/api/tasks/", body, format="json").json()["id"]

    # when the worker runs it
    wait_for(lambda: _status(task_id) == TaskStatus.COMPLETED)

    # then it ran three times, and the gaps between attempts grew with the backoff
    starts = [log.created_at for log in _logs(task_id) if log.event == "started"]
    assert len(starts) == 3
    first_gap = (starts[1] - starts[0]).total_seconds()
    second_gap = (starts[2] - starts[1]).total_seconds()
    assert 0.3 <= first_gap < second_gap
    assert second_gap >= 0.6
    delays = [log.data["delay_s"] for log in _logs(task_id) if log.event == "retry_scheduled"]
    assert delays == [0.3, 0.6]
    task = api.get(f"/api/tasks/{task_id}/").json()
    assert task["retries"] == 2 and task["attempt"] == 3 and task["error"] == ""


def test_task_failing_for_good_ends_failed_in_the_dead_letter_queue(
    api, worker, staff_user, client_for
):
    retryable = api.post(
        "/api/tasks/",
        {"type": "NOOP", "payload": {"fail_times": 5}, "max_retries": 1, "retry_backoff_s": 0.1},
        format="json",
    ).json()["id"]
    permanent = api.post(
        "/api/tasks/", {"type": "NOOP", "payload": {"fail": True}}, format="json"
    ).json()["id"]

    wait_for(
        lambda: _status(retryable) == TaskStatus.FAILED and _status(permanent) == TaskStatus.FAILED
    )

    dead = {row["id"]: row for row in api.get("/api/queues/dead-letter/").json()["results"]}
    assert dead[retryable]["failure_class"] == "retries_exhausted"
    assert dead[retryable]["retries"] == 1
    assert dead[permanent]["failure_class"] == "non_retryable"
    assert "fail: true" in dead[permanent]["error"]
    # a permanent failure is not retried at all
    assert [log.event for log in _logs(permanent)] == ["created", "started", "failed"]

    # and a redrive (staff only) sends it back through the worker
    response = client_for(staff_user).post(
        "/api/queues/dead-letter/redrive/", {"task_ids": [retryable]}, format="json"
    )
    assert response.status_code == 202 and response.json() == {"redriven": 1}
    wait_for(
        lambda: (
            _status(retryable) == TaskStatus.FAILED
            and any(log.event == "requeued" for log in _logs(retryable))
        )
    )


def test_cancel_while_running_stops_the_handler_at_its_next_check(api, worker):
    task_id = api.post(
        "/api/tasks/", {"type": "NOOP", "payload": {"sleep_ms": 20000}}, format="json"
    ).json()["id"]
    wait_for(lambda: _status(task_id) == TaskStatus.PROCESSING)

    response = api.post(f"/api/tasks/{task_id}/cancel/")

    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    wait_for(lambda: _status(task_id) == TaskStatus.CANCELLED, timeout=5)
    assert api.post(f"/api/tasks/{task_id}/cancel/").status_code == 409


def _niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_a_worker_and_its_pool_run_below_the_api_s_cpu_priority(worker):
    # given a worker started at the shipped default (QW_WORKER_NICE 5), from this process
    ours = _niceness(os.getpid())

    # then the worker and each of its pool processes run 5 steps nicer than their starter
    wait_for(lambda: len(worker.children()) == 2)
    for pid in [worker.popen.pid, *worker.children()]:
        assert _niceness(pid) == min(ours + 5, 19), pid


def test_a_worker_started_with_nice_0_keeps_its_priority(spawn):
    started = spawn("worker", QW_WORKER_NICE="0")
    wait_for(lambda: len(started.children()) == 2)
    for pid in [started.popen.pid, *started.children()]:
        assert _niceness(pid) == _niceness(os.getpid()), pid
