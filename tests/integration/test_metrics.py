"""``/metrics`` follows tasks that a real worker runs over RabbitMQ and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasks_app.models import Task, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

N_OK = 6
N_FAIL = 3


def _scrape(client: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


NOOP = _key(type="NOOP", queue="task.created")
NOOP_PENDING = _key(type="NOOP", queue="task.created", status="PENDING")


def _depth(client: Any) -> float | None:
    return _scrape(client).get("queueworker_queue_messages", {}).get(_key(queue="task.created"))


def test_counters_and_queue_depth_follow_a_real_worker(api, client, spawn):
    # given NOOP tasks created through the API, some failing for good, before any worker runs
    bodies = [{"type": "NOOP", "payload": {}}] * N_OK + [
        {"type": "NOOP", "payload": {"fail": True}}
    ] * N_FAIL
    ids = []
    for body in bodies:
        response = api.post("/api/tasks/", body, format="json")
        assert response.status_code == 201
        ids.append(response.json()["id"])
    before = _scrape(client)
    assert before["queueworker_broker_up"][()] == 1
    assert before["queueworker_tasks_created_total"][NOOP] == N_OK + N_FAIL
    assert before["queueworker_tasks"][NOOP_PENDING] == N_OK + N_FAIL
    assert _depth(client) >= N_OK + N_FAIL

    # when a worker runs them
    spawn("worker")
    finished = (TaskStatus.COMPLETED, TaskStatus.FAILED)
    wait_for(
        lambda: Task.objects.filter(pk__in=ids, status__in=finished).count() == len(ids),
        timeout=30,
    )

    # then the counters match what happened, and task.created is drained with a consumer
    after = _scrape(client)
    assert after["queueworker_tasks_created_total"][NOOP] == N_OK + N_FAIL
    assert after["queueworker_tasks_started_total"][NOOP] == N_OK + N_FAIL
    assert after["queueworker_tasks_completed_total"][NOOP] == N_OK
    assert after["queueworker_tasks_failed_total"][NOOP] == N_FAIL
    assert after["queueworker_tasks_retried_total"][NOOP] == 0
    assert after["queueworker_task_duration_seconds_count"][_key(type="NOOP")] == N_OK
    assert after["queueworker_dead_letters"][_key(failure_class="non_retryable")] == N_FAIL
    assert after["queueworker_tasks"][NOOP_PENDING] == 0
    wait_for(lambda: _depth(client) == 0, timeout=15)
    consumers = _scrape(client)["queueworker_queue_consumers"][_key(queue="task.created")]
    assert consumers >= 1

    # and the JSON figures agree
    summary = api.get("/api/metrics/").json()
    assert summary["tasks"]["by_type_status"]["NOOP"]["COMPLETED"] == N_OK
    assert summary["windows"]["1m"]["failed"] == N_FAIL
    assert summary["durations"]["by_type"]["NOOP"]["count"] == N_OK
