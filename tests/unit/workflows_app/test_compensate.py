"""POST /api/tasks/{id}/compensate/: undo a COMPLETED task by hand (docs/api.md)."""

from __future__ import annotations

import pytest

from tasks_app import dispatch, worker
from tasks_app.models import Task, TaskStatus
from workflows_app import services

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))


def _completed_task(api) -> str:
    task_id = api.post(
        "/api/tasks/", {"type": "NOOP", "payload": {"result": 5}}, format="json"
    ).json()["id"]
    worker.run(task_id, timeout_s=30)
    return task_id


def test_compensate_with_an_action_creates_the_compensation_once(api):
    task_id = _completed_task(api)
    body = {"action": {"type": "NOOP", "payload": {"result": "undone"}}}

    first = api.post(f"/api/tasks/{task_id}/compensate/", body, format="json")
    second = api.post(f"/api/tasks/{task_id}/compensate/", body, format="json")

    assert first.status_code == 201, first.content
    created = first.json()
    assert created["type"] == "COMPENSATION" and created["parent"] == task_id
    assert created["payload"] == {"compensates": task_id, "action": body["action"]}
    worker.run(created["id"], timeout_s=30)
    assert Task.objects.get(pk=created["id"]).status == TaskStatus.COMPLETED
    assert second.status_code == 409


def test_compensate_uses_the_steps_declared_compensation(api, user):
    definition = {
        "start": "a",
        "steps": {
            "a": {
                "type": "NOOP",
                "compensation": {
                    "type": "NOOP",
                    "payload": {"result": {"$ref": "steps.a.result.attempt"}},
                },
            }
        },
    }
    wf = services.workflow_create(owner=user, name="w", definition=definition)
    run = services.run_start(workflow=wf, owner=user, input={})
    step = run.tasks.get()
    worker.run(str(step.pk), timeout_s=30)

    response = api.post(f"/api/tasks/{step.pk}/compensate/", {}, format="json")

    assert response.status_code == 201
    assert response.json()["payload"]["action"] == {"type": "NOOP", "payload": {"result": 1}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "action"),  # a plain task declares nothing
        ({"action": {"type": "NOPE"}}, "action"),
        ({"action": {"type": "NOOP", "payload": {"sleep_ms": -5}}}, "action"),
        ({"action": "x"}, "action"),
    ],
)
def test_bad_compensation_requests_are_400_and_write_nothing(api, body, field):
    task_id = _completed_task(api)
    before = Task.objects.count()

    response = api.post(f"/api/tasks/{task_id}/compensate/", body, format="json")

    assert response.status_code == 400 and field in response.json(), response.content
    assert Task.objects.count() == before


def test_only_completed_tasks_can_be_compensated(api):
    task_id = api.post("/api/tasks/", {"type": "NOOP"}, format="json").json()["id"]
    response = api.post(
        f"/api/tasks/{task_id}/compensate/", {"action": {"type": "NOOP"}}, format="json"
    )
    assert response.status_code == 409
