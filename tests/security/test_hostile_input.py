"""Hostile bodies on every write endpoint: a 4xx with a JSON body naming the problem, and nothing
written (docs/api.md).

Each endpoint is called with a valid body once (it acts: the refusals below are what stops it)
and with every hostile body; the tables the API writes are compared before and after. Task-level
field rules are in ``tests/unit/test_api_bad_input.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from tests.security._world import World, build_world, snapshot

pytestmark = pytest.mark.django_db

DEEP = 10_000


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: Callable[[World], str]
    valid: Any  # a body the endpoint accepts
    accepts: int  # its answer to that body
    field: str  # a field where a huge string and a huge array are both invalid
    staff: bool = False  # staff-only: called as staff

    def body_with(self, value: Any) -> dict[str, Any]:
        base = self.valid if isinstance(self.valid, dict) else {}
        return {**base, self.field: value}


ENDPOINTS = {
    "task-create": Endpoint("post", lambda w: "/api/tasks/", {"type": "NOOP"}, 201, "type"),
    "task-bulk": Endpoint(
        "post", lambda w: "/api/tasks/bulk/", {"tasks": [{"type": "NOOP"}]}, 201, "tasks"
    ),
    "workflow-create": Endpoint(
        "post",
        lambda w: "/api/workflows/",
        {"name": "another", "definition": {"start": "a", "steps": {"a": {"type": "NOOP"}}}},
        201,
        "name",
    ),
    "workflow-patch": Endpoint(
        "patch",
        lambda w: f"/api/workflows/{w.workflow.pk}/",
        {"description": "changed"},
        200,
        "name",
    ),
    "run-start": Endpoint(
        "post", lambda w: f"/api/workflows/{w.workflow.pk}/runs/", {"input": {}}, 201, "input"
    ),
    "schedule-create": Endpoint(
        "post",
        lambda w: "/api/schedules/",
        {"name": "another", "interval_s": 60, "target": {"task": {"type": "NOOP"}}},
        201,
        "name",
    ),
    "schedule-patch": Endpoint(
        "patch", lambda w: f"/api/schedules/{w.schedule.pk}/", {"overlap": "skip"}, 200, "name"
    ),
    "schedule-trigger": Endpoint(
        "post", lambda w: f"/api/schedules/{w.schedule.pk}/trigger/", {}, 202, "note"
    ),
    "task-cancel": Endpoint(
        "post", lambda w: f"/api/tasks/{w.pending.pk}/cancel/", {}, 200, "note"
    ),
    "task-retry": Endpoint("post", lambda w: f"/api/tasks/{w.failed.pk}/retry/", {}, 202, "note"),
    "task-compensate": Endpoint(
        "post",
        lambda w: f"/api/tasks/{w.completed.pk}/compensate/",
        {"action": {"type": "NOOP"}},
        201,
        "action",
    ),
    "run-cancel": Endpoint(
        "post", lambda w: f"/api/workflow-runs/{w.run.pk}/cancel/", {}, 202, "note"
    ),
    # The run is RUNNING: retry answers 409, after the body was judged.
    "run-retry": Endpoint(
        "post", lambda w: f"/api/workflow-runs/{w.run.pk}/retry/", {}, 409, "note"
    ),
    "redrive": Endpoint(
        "post",
        lambda w: "/api/queues/dead-letter/redrive/",
        {"task_ids": []},  # replaced by the world's dead letter in _valid_body
        202,
        "task_ids",
        staff=True,
    ),
    "purge": Endpoint(
        "post",
        lambda w: "/api/queues/task.created/purge/",
        {"confirm": "task.created"},
        200,
        "confirm",
        staff=True,
    ),
}


@pytest.fixture
def world(user) -> World:
    return build_world(user)


@pytest.fixture
def caller(user, staff_user, client_for) -> Callable[[Endpoint], APIClient]:
    return lambda endpoint: client_for(staff_user if endpoint.staff else user)


def _valid_body(name: str, world: World) -> Any:
    if name == "redrive":
        return {"task_ids": [str(world.failed.pk)]}
    return ENDPOINTS[name].valid


def _send(
    client: APIClient, endpoint: Endpoint, world: World, body: bytes | str, **extra: Any
) -> Any:
    extra.setdefault("content_type", "application/json")
    return client.generic(endpoint.method.upper(), endpoint.path(world), body, **extra)


def _limit() -> int:
    return int(settings.QW_MAX_PAYLOAD_BYTES)


def _huge_string(endpoint: Endpoint) -> bytes:
    room = _limit() - len(json.dumps(endpoint.body_with("")).encode()) - 16
    return json.dumps(endpoint.body_with("x" * room)).encode()


def _huge_array(endpoint: Endpoint) -> bytes:
    room = _limit() - len(json.dumps(endpoint.body_with([])).encode()) - 16
    return json.dumps(endpoint.body_with(["x"] * (room // 5))).encode()  # '"x", ' per item


def _over_limit(endpoint: Endpoint) -> bytes:
    return json.dumps(endpoint.body_with("x" * _limit())).encode()


def _deep_object(endpoint: Endpoint) -> bytes:
    nested = '{"a": ' * DEEP + "1" + "}" * DEEP
    return ('{"' + endpoint.field + '": ' + nested + "}").encode()


# (id, body builder, the status, a fragment of the answer that names the problem)
HOSTILE_BODIES: list[Any] = [
    pytest.param(lambda e: b'{"type": "NOOP",', 400, "JSON parse error", id="malformed"),
    pytest.param(lambda e: b'{"a": 1} trailing', 400, "JSON parse error", id="trailing-garbage"),
    pytest.param(lambda e: b"\xff\xfe{}", 400, "not utf-8", id="invalid-utf8"),
    pytest.param(lambda e: b'{"a": "\xc3\x28"}', 400, "not utf-8", id="invalid-utf8-in-string"),
    pytest.param(lambda e: b'{"a": NaN}', 400, "NaN", id="nan"),
    pytest.param(
        lambda e: ("[" * DEEP + "]" * DEEP).encode(), 400, "nested too deeply", id="deep-array"
    ),
    pytest.param(_deep_object, 400, "nested too deeply", id="deep-object"),
    pytest.param(
        lambda e: json.dumps(e.body_with("a\u0000b")).encode(), 400, "NUL", id="nul-in-string"
    ),
    pytest.param(
        lambda e: json.dumps({**e.body_with(1), "k\u0000": 1}).encode(), 400, "NUL", id="nul-in-key"
    ),
    pytest.param(
        lambda e: json.dumps(e.body_with({"nested": ["\ud800"]})).encode(),
        400,
        "surrogates",
        id="lone-surrogate",
    ),
    pytest.param(lambda e: b"[]", 400, "dictionary", id="array-not-object"),
    pytest.param(lambda e: b'"text"', 400, "dictionary", id="string-not-object"),
    pytest.param(_huge_string, 400, None, id="huge-string-within-limit"),
    pytest.param(_huge_array, 400, None, id="huge-array-within-limit"),
    pytest.param(_over_limit, 413, "QW_MAX_PAYLOAD_BYTES", id="over-limit"),
]


@pytest.mark.parametrize("name", ENDPOINTS)
def test_valid_body_is_accepted_and_acts(world, caller, name):
    # the baseline: the same endpoint, with a valid body, writes (or answers its state's 409)
    endpoint = ENDPOINTS[name]
    before = snapshot()

    response = _send(caller(endpoint), endpoint, world, json.dumps(_valid_body(name, world)))

    assert response.status_code == endpoint.accepts, response.content
    if endpoint.accepts < 300 and name != "purge":  # purge drops broker messages, not rows
        assert snapshot() != before


@pytest.mark.parametrize(("build", "status", "says"), HOSTILE_BODIES)
@pytest.mark.parametrize("name", ENDPOINTS)
def test_hostile_body_answers_4xx_json_and_writes_nothing(world, caller, name, build, status, says):
    # given
    endpoint = ENDPOINTS[name]
    body = build(endpoint)
    before = snapshot()

    # when
    response = _send(caller(endpoint), endpoint, world, body)

    # then a JSON answer names the problem: the message, or the field at fault
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    errors = response.json()
    assert (says or endpoint.field) in json.dumps(errors, ensure_ascii=False), errors
    assert len(response.content) < 4096, "a refusal must not echo or amplify the input"
    assert snapshot() == before


CONTENT_TYPES = [
    pytest.param("application/x-www-form-urlencoded", b"type=NOOP&note=x", id="form"),
    pytest.param(
        "multipart/form-data; boundary=BoUnDaRy",
        b"--BoUnDaRy\r\nContent-Disposition: form-data; "
        b'name="type"\r\n\r\nNOOP\r\n--BoUnDaRy--\r\n',
        id="multipart",
    ),
    pytest.param("text/plain", b'{"type": "NOOP"}', id="text-plain"),
    pytest.param("application/xml", b"<task><type>NOOP</type></task>", id="xml"),
    pytest.param("", b'{"type": "NOOP"}', id="none-declared"),
]


@pytest.mark.parametrize(("content_type", "body"), CONTENT_TYPES)
@pytest.mark.parametrize("name", ENDPOINTS)
def test_body_not_declared_json_answers_415_and_writes_nothing(
    world, caller, name, content_type, body
):
    endpoint = ENDPOINTS[name]
    before = snapshot()

    response = _send(caller(endpoint), endpoint, world, body, content_type=content_type)

    assert response.status_code == 415, response.content[:500]
    assert "Unsupported media type" in response.json()["detail"]
    assert snapshot() == before


@pytest.mark.parametrize("name", ENDPOINTS)
def test_chunked_body_over_limit_answers_413_and_writes_nothing(world, caller, name):
    # given a body sent as gunicorn presents a chunked request: no Content-Length, the de-chunked
    # stream in wsgi.input
    endpoint = ENDPOINTS[name]
    body = _over_limit(endpoint)
    before = snapshot()

    # when
    response = _send(
        caller(endpoint),
        endpoint,
        world,
        body,
        CONTENT_LENGTH="",
        HTTP_TRANSFER_ENCODING="chunked",
        **{"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True},
    )

    # then
    assert response.status_code == 413
    assert "QW_MAX_PAYLOAD_BYTES" in response.json()["detail"]
    assert snapshot() == before
