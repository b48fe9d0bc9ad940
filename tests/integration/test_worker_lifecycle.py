"""A task submitted over the API runs on a real Celery worker over RabbitMQ and PostgreSQL."""

from __future__ import annotations

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
