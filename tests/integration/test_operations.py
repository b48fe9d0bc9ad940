"""Operations against the real broker and worker: health, queue figures, redrive."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from queueworker import broker
from queueworker.celery import app
from tasks_app import dispatch
from tasks_app.models import Task, TaskStatus
from tests import session_env
from tests.conftest import wait_for
from tests.integration.test_recovery import _use_broker

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def fresh_health_checks(settings):
    """Every health request runs its checks (no results kept from an earlier test)."""
    settings.QW_HEALTH_CACHE_S = 0


def test_health_answers_503_naming_the_broker_within_3_s(client):
    good = app.conf.broker_url
    _use_broker("amqp://guest:guest@127.0.0.1:1//")
    try:
        started = time.monotonic()
        response = client.get("/api/health/")
        ready = client.get("/api/health/ready/")
        elapsed = time.monotonic() - started
    finally:
        _use_broker(good)

    assert response.status_code == 503 and ready.status_code == 503
    assert "broker" in response.json()["failing"] and "broker" in ready.json()["failing"]
    assert response.json()["checks"]["database"]["ok"] is True
    assert elapsed < 6.0  # two requests, each within 3 s
    assert client.get("/api/health/live/").status_code == 200


def test_health_is_200_with_a_worker_on_every_queue(client_for, staff_user, worker):
    staff = client_for(staff_user)  # details are for staff
    body = wait_for(
        lambda: (r := staff.get("/api/health/")).status_code == 200 and r.json(), timeout=15
    )
    assert set(body["checks"]) == {"database", "broker", "dispatcher", "workers", "queues"}
    assert "answered" in body["checks"]["workers"]["detail"]


def test_queue_figures_move_as_tasks_are_published_and_consumed(api, spawn):
    def figures():
        return {q["name"]: q for q in api.get("/api/queues/").json()}

    # given three wake-ups on a queue nobody consumes yet
    for _ in range(3):
        dispatch.publish([dispatch.Wakeup(str(uuid.uuid4()), "NOOP", "task.created", 0, 30)])
    before = figures()["task.created"]
    assert before["messages"] == 3 and before["consumers"] == 0
    assert before["messages_unacked"] is None  # no management API configured

    # when a worker starts, they are consumed (no such tasks: rejected to the dead letters)
    spawn("worker")

    after = wait_for(lambda: (f := figures()["task.created"])["messages"] == 0 and f, timeout=15)
    assert after["consumers"] >= 1
    assert set(figures()) >= {
        "http.request",
        "data.processing",
        "compensation",
        "task.created",
        "tasks.dead_letter",
    }


def test_redrive_takes_a_dead_lettered_task_back_to_completed(api, worker, staff_user, client_for):
    body = {"type": "NOOP", "payload": {"fail_times": 2}, "max_retries": 1, "retry_backoff_s": 0.1}
    task_id = api.post("/api/tasks/", body, format="json").json()["id"]
    wait_for(lambda: Task.objects.get(pk=task_id).status == TaskStatus.FAILED)

    staff = client_for(staff_user)  # redrive is staff-only
    response = staff.post(
        "/api/queues/dead-letter/redrive/", {"task_ids": [task_id]}, format="json"
    )

    assert response.status_code == 202
    wait_for(lambda: Task.objects.get(pk=task_id).status == TaskStatus.COMPLETED)
    assert Task.objects.get(pk=task_id).attempt == 3


def test_health_after_the_broker_closed_the_web_connections_finds_the_workers(
    client_for, staff_user, worker
):
    # given a healthy service whose web process holds pooled broker connections
    staff = client_for(staff_user)
    wait_for(lambda: staff.get("/api/health/").status_code == 200, timeout=15)

    # when RabbitMQ closes every connection of the vhost (the worker's too), and the worker
    # has reconnected
    reconnects = worker.output().count("Connected to amqp://")
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "--vhost", session_env.VHOST, "test"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    wait_for(lambda: worker.output().count("Connected to amqp://") > reconnects, timeout=30)
    wait_for(_every_queue_has_a_consumer_again, timeout=15)

    # then the very next health check finds it (one retry on a fresh connection)
    response = staff.get("/api/health/")
    assert response.status_code == 200, response.json()
    assert response.json()["checks"]["workers"]["ok"] is True


def _every_queue_has_a_consumer_again() -> bool:
    """Asked on connections of its own, so the web's pool stays as the broker left it."""
    work_queues = [q.name for q in app.conf.task_queues]
    return all(s.consumers for s in broker.queue_stats(work_queues))
