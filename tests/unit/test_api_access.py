"""Authentication and owner scoping of the task API, and the endpoints open to all (docs/api.md).

Every URL of the project without credentials, with an unknown token, and with another user's
ids is in ``tests/security/test_access.py``.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from rest_framework.test import APIClient

from tasks_app.models import Task
from tests.factories import TaskFactory, UserFactory

pytestmark = pytest.mark.django_db

TASK_PATHS = [
    "/api/tasks/",
    "/api/tasks/bulk/",
    "/api/tasks/{id}/",
    "/api/tasks/{id}/logs/",
    "/api/tasks/{id}/cancel/",
    "/api/tasks/{id}/retry/",
]


# --- authentication ----------------------------------------------------------------------------


def test_session_login_is_accepted(user):
    client = APIClient()
    client.force_login(user)

    assert client.get("/api/tasks/").status_code == 200


def test_inactive_users_token_answers_401(user, client_for):
    client = client_for(user)
    user.is_active = False
    user.save(update_fields=["is_active"])

    assert client.get("/api/tasks/").status_code == 401


# --- owner scoping -----------------------------------------------------------------------------


def test_list_shows_only_own_tasks(api, user):
    mine = TaskFactory(owner=user)
    TaskFactory(owner=UserFactory())

    body = api.get("/api/tasks/").json()

    assert [row["id"] for row in body["results"]] == [str(mine.id)]


def test_list_filter_cannot_reach_other_users_children(api, user):
    other_parent = TaskFactory(owner=UserFactory())
    TaskFactory(owner=other_parent.owner, parent=other_parent)

    body = api.get(f"/api/tasks/?parent={other_parent.id}").json()

    assert body["results"] == []


def test_staff_sees_every_task(staff_user, client_for):
    # given tasks of two other users
    first, second = TaskFactory(owner=UserFactory()), TaskFactory(owner=UserFactory())
    staff = client_for(staff_user)

    # when / then
    listed = {row["id"] for row in staff.get("/api/tasks/").json()["results"]}
    assert listed == {str(first.id), str(second.id)}
    assert staff.get(f"/api/tasks/{first.id}/").status_code == 200
    assert staff.get(f"/api/tasks/{first.id}/logs/").status_code == 200
    cancelled = staff.post(f"/api/tasks/{second.id}/cancel/")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"


def test_parent_of_another_user_answers_400_naming_parent(api):
    foreign = TaskFactory(owner=UserFactory())

    response = api.post("/api/tasks/", {"type": "NOOP", "parent": str(foreign.id)}, format="json")

    assert response.status_code == 400
    assert "parent" in response.json()
    assert Task.objects.count() == 1


def test_unknown_parent_answers_400_naming_parent(api):
    response = api.post("/api/tasks/", {"type": "NOOP", "parent": str(uuid.uuid4())}, format="json")

    assert response.status_code == 400
    assert "parent" in response.json()
    assert Task.objects.count() == 0


def test_parent_of_another_user_in_bulk_answers_400(api):
    foreign = TaskFactory(owner=UserFactory())

    response = api.post(
        "/api/tasks/bulk/", {"tasks": [{"type": "NOOP", "parent": str(foreign.id)}]}, format="json"
    )

    assert response.status_code == 400
    assert "parent" in response.json()["tasks"]["0"]
    assert Task.objects.count() == 1


def test_staff_may_name_any_task_as_parent(staff_user, client_for):
    foreign = TaskFactory(owner=UserFactory())

    response = client_for(staff_user).post(
        "/api/tasks/", {"type": "NOOP", "parent": str(foreign.id)}, format="json"
    )

    assert response.status_code == 201, response.content
    assert response.json()["parent"] == str(foreign.id)


# --- open endpoints ----------------------------------------------------------------------------


def test_schema_is_open_and_lists_every_task_path():
    # when the schema is fetched without credentials
    response = APIClient().get("/api/schema/", {"format": "json"})

    # then every task path is listed
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    for path in TASK_PATHS:
        assert path in paths, f"{path} missing from the schema"
    assert set(paths["/api/tasks/"]) >= {"get", "post"}
    for path in ("/api/tasks/bulk/", "/api/tasks/{id}/cancel/", "/api/tasks/{id}/retry/"):
        assert "post" in paths[path]
    assert "get" in paths["/api/tasks/{id}/logs/"]


def test_schema_documents_request_bodies():
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()
    components = schema["components"]["schemas"]

    def body_schema(path: str) -> dict[str, Any]:
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        ref = content["application/json"]["schema"]["$ref"]
        return components[ref.rsplit("/", 1)[-1]]

    create = body_schema("/api/tasks/")
    assert {
        "type",
        "payload",
        "max_retries",
        "priority",
        "scheduled_at",
        "delay_ms",
        "timeout_s",
        "parent",
        "idempotency_key",
    } <= set(create["properties"])
    assert create["required"] == ["type"]
    bulk = body_schema("/api/tasks/bulk/")
    assert bulk["required"] == ["tasks"]
    assert bulk["properties"]["tasks"]["type"] == "array"
    create_params = {p["name"] for p in schema["paths"]["/api/tasks/"]["post"]["parameters"]}
    assert "Idempotency-Key" in create_params
    assert {"200", "201", "409"} <= set(schema["paths"]["/api/tasks/"]["post"]["responses"])


def test_docs_are_open():
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
    assert b"/api/schema/" in response.content
