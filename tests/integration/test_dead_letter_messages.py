"""Messages the application never accepted land in tasks.dead_letter and are recorded."""

from __future__ import annotations

import pickle
import uuid

import pytest
from kombu import Producer

from queueworker.celery import app
from tasks_app.dispatch import EXECUTE_TASK
from tasks_app.models import DeadLetterMessage, Task, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROUTE = {"queue": "task.created", "exchange": "tasks", "routing_key": "task.created"}


def _raw(body: bytes, content_type: str, headers: dict) -> None:
    with app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(
            body,
            content_type=content_type,
            content_encoding="binary",
            headers=headers,
            exchange="tasks",
            routing_key="task.created",
        )


def test_refused_messages_are_recorded_and_work_goes_on(api, worker):
    # when malformed messages reach a work queue
    app.send_task("no.such.task", kwargs={}, **ROUTE)
    missing = uuid.uuid4()
    app.send_task(EXECUTE_TASK, kwargs={"taskType": "NOOP", "taskId": str(missing)}, **ROUTE)
    app.send_task(EXECUTE_TASK, kwargs={"taskType": "NOOP", "taskId": "not-a-uuid"}, **ROUTE)
    _raw(
        pickle.dumps(([], {"taskId": str(missing)}, {})),
        "application/x-python-serialize",
        {"task": EXECUTE_TASK, "id": str(uuid.uuid4())},
    )

    # then a real task still completes without delay
    task_id = api.post("/api/tasks/", {"type": "NOOP"}, format="json").json()["id"]
    wait_for(lambda: Task.objects.get(pk=task_id).status == TaskStatus.COMPLETED, timeout=10)

    # and each refused message was recorded from tasks.dead_letter
    wait_for(lambda: DeadLetterMessage.objects.count() >= 4, timeout=15)
    reasons = {entry.reason: entry for entry in DeadLetterMessage.objects.all()}
    assert "unknown task name 'no.such.task'" in reasons
    assert f"no task {missing}" in reasons
    assert "no valid taskId" in reasons
    assert "not JSON (application/x-python-serialize)" in reasons  # recorded, never unpickled
    for entry in reasons.values():
        assert entry.failure_class == "invalid_message"
        assert entry.queue == "task.created"
    assert worker.popen.poll() is None  # no worker crashed

    # staff read them from the API
    from tests.factories import UserFactory

    staff = UserFactory(is_staff=True)
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(staff)
    listed = client.get("/api/queues/dead-letter/messages/").json()["results"]
    assert {row["reason"] for row in listed} == set(reasons)
    assert api.get("/api/queues/dead-letter/messages/").status_code == 403
