"""A type's rules between its payload and the task's own fields are checked at create."""

from __future__ import annotations

import pytest

from tasks_app.models import Task
from workflows_app.definition import DefinitionError, validate

pytestmark = pytest.mark.django_db

HTTP = {"url": "https://example.com/hook", "timeout_s": 60}


def test_request_timeout_above_the_task_timeout_is_a_400_naming_it(api):
    response = api.post(
        "/api/tasks/", {"type": "HTTP_REQUEST", "payload": HTTP, "timeout_s": 30}, format="json"
    )

    assert response.status_code == 400
    assert response.json() == {
        "payload": {"timeout_s": ["60 is greater than the task's own timeout_s (30)"]}
    }
    assert Task.objects.count() == 0


def test_request_timeout_within_the_task_timeout_is_accepted(api, monkeypatch):
    from tasks_app import dispatch

    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))
    response = api.post(
        "/api/tasks/", {"type": "HTTP_REQUEST", "payload": HTTP, "timeout_s": 60}, format="json"
    )
    assert response.status_code == 201, response.content


def test_workflow_step_is_held_to_its_own_timeout():
    step = {"type": "HTTP_REQUEST", "payload": HTTP, "timeout_s": 30}
    with pytest.raises(DefinitionError) as excinfo:
        validate({"start": "a", "steps": {"a": step}})
    assert excinfo.value.problems == [
        "steps.a.payload.timeout_s: 60 is greater than the task's own timeout_s (30)"
    ]
