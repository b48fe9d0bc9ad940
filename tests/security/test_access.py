"""Who may call what (docs/api.md): every URL of the project, found by walking the resolver, so a
new endpoint is covered the day it is added.

- Without credentials every URL answers 401, but the documented open ones: the health checks,
  ``/api/schema/``, ``/api/docs/`` and ``/metrics`` (unless ``QW_METRICS_TOKEN`` is set), and the
  login pages; the admin sends everyone who is not staff to its login page.
- Another user's id answers 404 on every detail and action endpoint, and changes nothing.
- Staff-only endpoints answer 403 to other users, and change nothing.
- ``QW_THROTTLE_CREATE`` limits task and run creation, and the retries, compensations and manual
  schedule fires that start work again, per user across processes (429 with ``Retry-After``).
- Tokens are revocable: a deleted or rotated token answers 401.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from rest_framework.authtoken.models import Token
from rest_framework.permissions import IsAdminUser
from rest_framework.test import APIClient

from tasks_app import dispatch
from tasks_app.models import Task, TaskStatus
from tests.conftest import service_env
from tests.factories import UserFactory
from tests.security._world import World, build_world, snapshot

pytestmark = pytest.mark.django_db

METHODS = ("get", "post", "put", "patch", "delete")
SOME_ID = "00000000-0000-4000-8000-000000000000"
# Values for the URL parameters of every pattern of the project.
PARAMETERS = {
    "pk": SOME_ID,
    "name": "task.created",
    "format": "json",
    "object_id": "1",
    "content_type_id": "1",
    "id": "1",
    "app_label": "tasks_app",
    "url": "nowhere/",
}

# docs/api.md: open without credentials.
OPEN = {"health", "health-live", "health-ready", "schema", "docs", "prometheus-metrics"}
# Pages that log in and out: open by nature.
LOGIN_PAGES = {"admin:login", "admin:logout", "rest_framework:login", "rest_framework:logout"}
# README "Using the API": the endpoints only staff may call.
STAFF_ONLY = {"queue-purge", "dead-letter-redrive", "dead-letter-message-list"}


@dataclass(frozen=True)
class Route:
    name: str  # namespace:name, or the route when unnamed
    path: str  # a concrete path that resolves to the pattern
    pattern: URLPattern

    @property
    def is_admin(self) -> bool:
        return self.path.startswith("/admin/")

    @property
    def view_class(self) -> Any:
        return getattr(self.pattern.callback, "cls", None)

    @property
    def actions(self) -> dict[str, str]:
        """A ViewSet route's method → action; empty for other views."""
        return dict(getattr(self.pattern.callback, "actions", None) or {})

    @property
    def basename(self) -> str | None:
        return getattr(self.pattern.callback, "initkwargs", {}).get("basename")

    @property
    def has_format_suffix(self) -> bool:
        return "(?P<format>" in str(self.pattern.pattern)


def _concrete(route: str) -> str:
    """A path for a route made of Django ``<conv:name>`` parts and DRF's regex parts."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: PARAMETERS[m.group(1)], route)
    path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: PARAMETERS[m.group(1)], path)
    return "/" + path.replace("^", "").replace("$", "").replace("\\.", ".").replace("/?", "/")


def _walk(patterns: list[Any], prefix: str = "", namespace: str = "") -> Iterator[Route]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            inner = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern), inner)
        else:
            route = prefix + str(entry.pattern)
            name = f"{namespace}{entry.name}" if entry.name else route
            yield Route(name, _concrete(route), entry)


ROUTES = list(_walk(get_resolver().url_patterns))
API_ROUTES = [r for r in ROUTES if not r.is_admin and r.name not in OPEN | LOGIN_PAGES]
ADMIN_ROUTES = [r for r in ROUTES if r.is_admin and r.name not in LOGIN_PAGES]
# Detail and action endpoints that take an object id (the format-suffix twins share the view).
OBJECT_CALLS = [
    pytest.param(route, method, id=f"{method.upper()} {route.path}")
    for route in ROUTES
    if "<pk>" in str(route.pattern.pattern) and not route.has_format_suffix
    for method in route.actions
]


def _ids(routes: list[Route]) -> list[str]:
    return [route.path for route in routes]


def test_url_walk_builds_paths_that_resolve_to_their_own_pattern():
    # the walk itself: every built path reaches the pattern it was built from
    assert len(ROUTES) > 50
    for route in ROUTES:
        assert resolve(route.path).func is route.pattern.callback, route


def test_url_walk_finds_every_documented_endpoint():
    names = {route.name for route in ROUTES}

    assert OPEN | STAFF_ONLY <= names
    assert {"task-list", "task-detail", "workflow-runs", "schedule-trigger"} <= names
    assert len(OBJECT_CALLS) >= 18


# --- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", API_ROUTES, ids=_ids(API_ROUTES))
def test_api_url_without_credentials_answers_401(route):
    before = snapshot()
    client = APIClient()

    for method in METHODS:
        response = getattr(client, method)(route.path, {}, format="json")

        assert response.status_code == 401, (method, response.status_code)
        assert response["WWW-Authenticate"].startswith("Token"), method
        assert "detail" in response.json(), method
    assert snapshot() == before


@pytest.mark.parametrize("route", API_ROUTES, ids=_ids(API_ROUTES))
def test_api_url_with_unknown_token_answers_401(route):
    before = snapshot()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")

    for method in METHODS:
        response = getattr(client, method)(route.path, {}, format="json")

        assert response.status_code == 401, (method, response.status_code)
    assert snapshot() == before


def test_metrics_needs_its_token_when_one_is_set(settings):
    settings.QW_METRICS_TOKEN = "scrape-secret"

    assert APIClient().get("/metrics").status_code == 401
    assert APIClient().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").status_code == 200


@pytest.mark.parametrize("name", sorted(OPEN))
def test_documented_open_endpoint_answers_without_credentials(settings, name):
    settings.QW_METRICS_TOKEN = ""
    settings.QW_HEALTH_TIMEOUT_S = 0.3
    (route,) = [r for r in ROUTES if r.name == name]

    response = APIClient().get(route.path)

    # the full health check answers 503 here (no worker runs), naming the check: not a refusal
    assert response.status_code in (200, 503), response.content[:300]
    assert response.status_code == 200 or name == "health"


@pytest.mark.parametrize("route", ADMIN_ROUTES, ids=_ids(ADMIN_ROUTES))
def test_admin_page_sends_anonymous_and_non_staff_users_to_login(user, route):
    logged_in = APIClient()
    logged_in.force_login(user)  # a session, but not staff

    for client in (APIClient(), logged_in):
        response = client.get(route.path)

        assert response.status_code == 302, response.status_code
        assert response["Location"].startswith("/admin/login/")


def test_admin_is_open_to_staff(staff_user):
    client = APIClient()
    client.force_login(staff_user)

    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/tasks_app/task/").status_code == 200


# --- owner scoping -----------------------------------------------------------------------------


@pytest.fixture
def others(db: Any) -> World:
    """Another user's objects, one of each kind."""
    return build_world(UserFactory())


def _object_path(route: Route, world: World) -> str:
    assert route.basename is not None, route
    object_id = world.id_for(route.basename)
    return route.path.replace(SOME_ID, object_id)


@pytest.mark.parametrize(("route", "method"), OBJECT_CALLS)
def test_other_users_object_answers_404_and_is_unchanged(api, others, route, method):
    # given another user's objects
    before = snapshot()

    # when the caller names one of them
    response = getattr(api, method)(_object_path(route, others), {}, format="json")

    # then it does not exist for the caller, and nothing changed
    assert response.status_code == 404, response.content[:300]
    assert snapshot() == before


@pytest.mark.parametrize(("route", "method"), OBJECT_CALLS)
def test_own_object_is_found_by_the_same_call(user, api, route, method):
    # the control for the test above: the owner reaches the same endpoint
    mine = build_world(user)

    response = getattr(api, method)(_object_path(route, mine), {}, format="json")

    assert response.status_code != 404, response.content[:300]


# --- staff only --------------------------------------------------------------------------------


def _permissions(route: Route) -> list[Any]:
    initkwargs = getattr(route.pattern.callback, "initkwargs", {})
    return list(initkwargs.get("permission_classes") or route.view_class.permission_classes)


def test_staff_only_endpoints_are_exactly_the_documented_ones():
    staff_only = {r.name for r in ROUTES if r.view_class and IsAdminUser in _permissions(r)}

    assert staff_only == STAFF_ONLY


STAFF_CALLS = [
    pytest.param(
        "post", "/api/queues/task.created/purge/", {"confirm": "task.created"}, id="purge"
    ),
    pytest.param("post", "/api/queues/dead-letter/redrive/", {"all": True}, id="redrive"),
    pytest.param("get", "/api/queues/dead-letter/messages/", None, id="dead-letter-messages"),
]


@pytest.mark.parametrize(("method", "path", "body"), STAFF_CALLS)
def test_staff_only_endpoint_answers_403_to_a_user_and_changes_nothing(
    user, api, method, path, body
):
    # given the caller's own dead letter, which a redrive would requeue
    world = build_world(user)
    before = snapshot()

    response = getattr(api, method)(path, body, format="json")

    assert response.status_code == 403
    assert "permission" in response.json()["detail"]
    assert snapshot() == before
    assert Task.objects.get(pk=world.failed.pk).status == TaskStatus.FAILED


@pytest.mark.parametrize(("method", "path", "body"), STAFF_CALLS)
def test_staff_only_endpoint_serves_staff(staff_user, client_for, method, path, body):
    build_world(UserFactory())

    response = getattr(client_for(staff_user), method)(path, body, format="json")

    assert response.status_code in (200, 202), response.content[:300]


# --- throttling --------------------------------------------------------------------------------


@pytest.fixture
def throttle(db, settings) -> Iterator[str]:
    settings.QW_THROTTLE_CREATE = "2/minute"
    cache.clear()  # DRF keeps the request history in the default cache
    yield settings.QW_THROTTLE_CREATE
    cache.clear()


def _create_task(client: APIClient) -> Any:
    return client.post("/api/tasks/", {"type": "NOOP"}, format="json")


def test_create_over_the_rate_answers_429_with_retry_after(api, throttle):
    # given the two creations the rate allows
    assert [_create_task(api).status_code for _ in range(2)] == [201, 201]
    before = Task.objects.count()

    # when
    response = _create_task(api)

    # then
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0
    assert "throttled" in response.json()["detail"].lower()
    assert Task.objects.count() == before


def test_bulk_create_counts_once_against_the_rate(api, throttle):
    bulk = {"tasks": [{"type": "NOOP"}] * 5}

    first = api.post("/api/tasks/bulk/", bulk, format="json")
    second = api.post("/api/tasks/bulk/", bulk, format="json")
    third = _create_task(api)

    assert (first.status_code, second.status_code, third.status_code) == (201, 201, 429)
    assert Task.objects.count() == 10


def test_run_start_shares_the_create_rate(user, api, throttle):
    world = build_world(user)
    runs = f"/api/workflows/{world.workflow.pk}/runs/"

    assert _create_task(api).status_code == 201
    assert api.post(runs, {"input": {}}, format="json").status_code == 201
    assert api.post(runs, {"input": {}}, format="json").status_code == 429
    assert _create_task(api).status_code == 429


def test_throttle_is_per_user_and_spares_other_calls(user, api, client_for, throttle):
    world = build_world(user)
    for _ in range(2):
        _create_task(api)

    assert _create_task(client_for(UserFactory())).status_code == 201
    assert api.get("/api/tasks/").status_code == 200
    assert api.post(f"/api/tasks/{world.pending.pk}/cancel/").status_code == 200


CHILD_THROTTLE = """
import sys
from types import SimpleNamespace

import django

django.setup()
from django.contrib.auth.models import User
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from queueworker.api import CreateThrottle

request = Request(APIRequestFactory().post("/api/tasks/"))
request.user = User.objects.get(pk=int(sys.argv[1]))
view = SimpleNamespace(action="create", throttled_actions=("create",), throttle_scope="create")
print("allowed" if CreateThrottle().allow_request(request, view) else "throttled")
"""


def test_throttle_count_is_shared_between_processes(
    transactional_db, user, api, settings, monkeypatch
):
    # given one creation counted by this process, on the shared cache
    settings.QW_THROTTLE_CREATE = "2/minute"
    cache.clear()
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))
    assert _create_task(api).status_code == 201

    # when two other processes ask the throttle for the same user
    env = service_env(QW_THROTTLE_CREATE="2/minute", DJANGO_SETTINGS_MODULE="queueworker.settings")
    verdicts = [
        subprocess.run(
            [sys.executable, "-c", CHILD_THROTTLE, str(user.pk)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split()[-1]
        for _ in range(2)
    ]

    # then the first takes the last slot, the second and this process are refused
    assert verdicts == ["allowed", "throttled"]
    assert _create_task(api).status_code == 429
    cache.clear()


def test_shared_cache_keeps_the_throttle_history_of_many_users(db):
    # Django's database cache would cull a third of its rows past 300 entries
    cache.clear()
    keys = [f"throttle_create_{n}" for n in range(400)]

    for key in keys:
        cache.set(key, [1.0], 60)

    assert len(cache.get_many(keys)) == len(keys)
    cache.clear()


def test_retry_compensate_and_trigger_share_the_create_rate(user, api, throttle):
    # given a user who has used up the rate
    world = build_world(user)
    assert [_create_task(api).status_code for _ in range(2)] == [201, 201]
    before = snapshot()

    # when each action that starts work again is called
    responses = {
        path: api.post(path, body, format="json")
        for path, body in (
            (f"/api/tasks/{world.failed.pk}/retry/", {}),
            (f"/api/tasks/{world.completed.pk}/compensate/", {"action": {"type": "NOOP"}}),
            (f"/api/workflow-runs/{world.run.pk}/retry/", {}),
            (f"/api/schedules/{world.schedule.pk}/trigger/", {}),
        )
    }

    # then each is refused with a time to wait, and nothing changed
    assert {path: r.status_code for path, r in responses.items()} == dict.fromkeys(responses, 429)
    assert all(int(r["Retry-After"]) > 0 for r in responses.values())
    assert snapshot() == before


def test_create_is_not_throttled_without_a_rate(api, settings):
    settings.QW_THROTTLE_CREATE = None
    cache.clear()

    assert {_create_task(api).status_code for _ in range(5)} == {201}


# --- tokens ------------------------------------------------------------------------------------


def test_deleted_token_answers_401(user, client_for):
    client = client_for(user)
    assert client.get("/api/tasks/").status_code == 200

    Token.objects.filter(user=user).delete()

    assert client.get("/api/tasks/").status_code == 401


def test_rotated_token_replaces_the_old_one(user, client_for):
    # given a client on the user's token
    old = client_for(user)

    # when the token is rotated as the README says
    call_command("drf_create_token", "-r", user.username, stdout=io.StringIO())

    # then the old key answers 401, the new one works
    assert old.get("/api/tasks/").status_code == 401
    assert client_for(user).get("/api/tasks/").status_code == 200


def test_staff_revokes_a_token_in_the_admin(user, client_for, staff_user):
    client = client_for(user)
    admin = APIClient()
    admin.force_login(staff_user)

    response = admin.post(
        f"/admin/authtoken/tokenproxy/{user.pk}/delete/", {"post": "yes"}, follow=False
    )

    assert response.status_code == 302
    assert client.get("/api/tasks/").status_code == 401
