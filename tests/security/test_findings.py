"""Regressions for what the fuzz (``test_fuzz_schema.py``) and the hostile-input tests found:
each answered a 500, echoed its input back, or cost seconds of CPU per request."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import kombu.exceptions
import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework import serializers
from rest_framework.fields import empty

from queueworker import api as project_api
from queueworker import broker
from tasks_app.api.serializers import BulkItemInput
from tasks_app.models import Task
from tests.security._world import World, build_world, snapshot
from workflows_app.models import Workflow

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(user) -> World:
    return build_world(user)


def _api_collection_paths() -> list[str]:
    """The list and create URLs of every router of the API (no object id, no format suffix)."""
    found = []
    for entry in get_resolver().url_patterns:
        if isinstance(entry, URLResolver) and str(entry.pattern) == "api/":
            for pattern in entry.url_patterns:
                route = str(pattern.pattern)
                if isinstance(pattern, URLPattern) and route.startswith("^") and "(?P" not in route:
                    found.append("/api/" + route.strip("^$"))
    return found


@pytest.mark.parametrize("path", _api_collection_paths())
def test_options_describes_the_endpoint_instead_of_failing(staff_user, client_for, path):
    # OPTIONS asked DRF's metadata for the fields of a serializer_class these views do not have
    response = client_for(staff_user).options(path)

    assert response.status_code == 200
    assert set(response.json()) == {"name", "description", "renders", "parses"}


def test_options_needs_credentials():
    from rest_framework.test import APIClient

    assert APIClient().options("/api/tasks/").status_code == 401


def test_deleting_a_workflow_with_runs_answers_409_and_keeps_it(api, world):
    # the runs hold the workflow (a protected foreign key): the delete was a 500
    response = api.delete(f"/api/workflows/{world.workflow.pk}/")

    assert response.status_code == 409
    assert response.json() == {"detail": "Cannot delete it: it is referenced by 1 workflow run."}
    assert Workflow.objects.filter(pk=world.workflow.pk).exists()


@pytest.mark.parametrize(
    ("name", "path", "body"),
    [
        ("payload", "/api/tasks/", {"type": "NOOP", "payload": {"result": "a\u0000b"}}),
        ("surrogate", "/api/tasks/", {"type": "NOOP", "payload": {"result": ["\ud800"]}}),
        ("key", "/api/tasks/", {"type": "NOOP", "payload": {"result": {"k\u0000": 1}}}),
        ("bulk", "/api/tasks/bulk/", {"tasks": [{"type": "NOOP", "payload": {"result": "\x00"}}]}),
        (
            "schedule-target",
            "/api/schedules/",
            {
                "name": "n",
                "interval_s": 60,
                "target": {"task": {"type": "NOOP", "payload": {"result": "\u0000"}}},
            },
        ),
    ],
)
def test_string_postgresql_cannot_store_answers_400_naming_its_path(api, world, name, path, body):
    # jsonb refuses \u0000 and unpaired surrogates: the insert failed as a 500 (DataError)
    before = snapshot()

    response = api.post(path, json.dumps(body), content_type="application/json")

    assert response.status_code == 400, response.content
    assert "$." in response.json()["detail"]
    assert snapshot() == before


def test_run_input_with_nul_answers_400(api, world):
    before = snapshot()

    response = api.post(
        f"/api/workflows/{world.workflow.pk}/runs/",
        json.dumps({"input": {"sku": "a\u0000"}}),
        content_type="application/json",
    )

    assert response.status_code == 400
    assert "$.input.sku" in response.json()["detail"]
    assert snapshot() == before


def test_storable_document_passes_the_nul_check():
    # escapes that PostgreSQL stores are untouched: a paired surrogate, other control characters
    document = json.loads('{"a": ["\\ud83d\\ude00", "\\u0001", {"\\u00e9": "\\\\u0000"}]}')

    assert project_api._unstorable_string(document) is None


@pytest.fixture
def checked(monkeypatch) -> Callable[[type], list[Any]]:
    """Record the values a field or serializer class validates."""

    def spy(cls: type) -> list[Any]:
        seen: list[Any] = []
        original = cls.run_validation

        def run_validation(self: Any, data: Any = empty) -> Any:
            seen.append(data)
            return original(self, data)

        monkeypatch.setattr(cls, "run_validation", run_validation)
        return seen

    return spy


def test_bulk_over_the_limit_is_refused_before_its_items_are_checked(api, settings, checked):
    # 1 MiB of `{}` items was 17 s of CPU and a 16 MB answer (one error per item)
    settings.QW_BULK_MAX = 10
    items = checked(BulkItemInput)

    response = api.post("/api/tasks/bulk/", {"tasks": [{}] * 5_000}, format="json")

    assert response.status_code == 400
    assert response.json() == {"tasks": ["At most 10 tasks per call (QW_BULK_MAX), got 5000."]}
    assert items == []
    assert Task.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task_ids": ["x"] * 20_000}, ["task_ids"]),
        ({"filter": {"failure_class": ["x"] * 20_000}}, ["filter", "failure_class"]),
    ],
    ids=["task-ids", "failure-classes"],
)
def test_redrive_list_over_its_limit_is_refused_before_its_items_are_checked(
    staff_user, client_for, checked, body, field
):
    # DRF checked every item first: 150,000 bad ids were 6 s and an 8 MB answer
    uuids, choices = checked(serializers.UUIDField), checked(serializers.ChoiceField)

    response = client_for(staff_user).post("/api/queues/dead-letter/redrive/", body, format="json")

    assert response.status_code == 400
    errors: Any = response.json()
    for key in field:
        errors = errors[key]
    (message,) = errors
    assert "no more than" in message
    assert uuids == [] and choices == []


def test_many_errors_in_one_field_show_the_first_and_a_count(api):
    # one error per unknown key: a 0.7 MB payload answered 1.6 MB of errors
    payload = {f"k{i:05}": 1 for i in range(5_000)}

    response = api.post("/api/tasks/", {"type": "NOOP", "payload": payload}, format="json")

    assert response.status_code == 400
    errors = response.json()["payload"]
    assert len(errors) == project_api.MAX_ERRORS + 1
    assert errors["k00000"] == ["unknown field"]
    assert errors[project_api.MORE] == [f"{5_000 - project_api.MAX_ERRORS} more errors not shown."]


def test_long_error_message_is_shortened(api, world):
    # a JSON Schema message quotes the whole instance: a 1 MiB input came back in the answer
    huge = "x" * 100_000

    response = api.post(f"/api/workflows/{world.workflow.pk}/runs/", {"input": huge}, format="json")

    assert response.status_code == 400
    (message,) = response.json()["input"]
    assert len(message) == project_api.MAX_MESSAGE_CHARS
    assert message.endswith("…")


def test_purge_of_a_queue_the_broker_has_not_declared_yet_purges_nothing(staff_user, client_for):
    # a fresh vhost: no worker has declared the queue yet; RabbitMQ's 404 was a 500
    response = client_for(staff_user).post(
        "/api/queues/task.created/purge/", {"confirm": "task.created"}, format="json"
    )

    assert response.status_code == 200
    assert response.json() == {"purged": 0}


def test_broker_down_answers_503(staff_user, client_for, monkeypatch):
    def down(name: str) -> Any:
        raise kombu.exceptions.OperationalError("[Errno 111] Connection refused")

    monkeypatch.setattr(broker, "purge", down)

    response = client_for(staff_user).post(
        "/api/queues/task.created/purge/", {"confirm": "task.created"}, format="json"
    )

    assert response.status_code == 503
    assert response.json() == {"detail": "The message broker is unavailable; try again later."}
