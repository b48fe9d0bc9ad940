"""Bad input gets a clear 4xx naming the field at fault, and changes nothing (docs/api.md).

The task API's own rules. Hostile bodies (malformed, deeply nested, huge, NUL, not JSON, over the
limit, chunked) on every write endpoint are in ``tests/security/test_hostile_input.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.conf import LazySettings
from django.test import AsyncClient
from django.test.client import FakePayload
from rest_framework.authtoken.models import Token

from tasks_app.models import Task, TaskLog
from tests.factories import TaskFactory

pytestmark = pytest.mark.django_db

DEEP = 10_000


@pytest.fixture
def nothing_written(user) -> Iterator[None]:
    """Assert that the test leaves the Task and TaskLog tables as it found them."""
    TaskFactory(owner=user)  # something that must not change either
    TaskLog.objects.create(task=Task.objects.get(), event="created")
    before = _snapshot()
    yield
    assert _snapshot() == before


def _snapshot() -> tuple[int, int, list[tuple[Any, ...]]]:
    rows = list(Task.objects.values_list("id", "status", "retries", "idempotency_key"))
    return Task.objects.count(), TaskLog.objects.count(), rows


def _post_raw(api, body: bytes | str, path: str = "/api/tasks/", **extra: Any) -> Any:
    extra.setdefault("content_type", "application/json")
    return api.post(path, body, **extra)


# --- documents that are not a create body ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        pytest.param(b"", "type", "required", id="empty-body"),
        pytest.param(b"null", "non_field_errors", "", id="null"),
        pytest.param(
            b'{"type": "NOOP", "payload": {"result": -Infinity}}',
            "detail",
            "Infinity",
            id="infinity",
        ),
        pytest.param(
            (
                '{"type": "NOOP", "payload": {"result": '
                + '{"a": ' * DEEP
                + "1"
                + "}" * DEEP
                + "}}"
            ).encode(),
            "detail",
            "nested",
            id="deep-payload",
        ),
    ],
)
def test_unparseable_or_non_object_body_answers_400(api, nothing_written, body, field, says):
    response = _post_raw(api, body)

    assert response.status_code == 400, response.content
    errors = response.json()
    assert field in errors
    assert says in json.dumps(errors[field])


# --- fields ------------------------------------------------------------------------------------


def _over_max_retries(s: LazySettings) -> dict[str, Any]:
    return {"type": "NOOP", "max_retries": s.QW_MAX_RETRIES_LIMIT + 1}


def _over_timeout(s: LazySettings) -> dict[str, Any]:
    return {"type": "NOOP", "timeout_s": s.QW_MAX_TIMEOUT_S + 1}


FIELD_CASES: list[Any] = [
    pytest.param({}, ["type"], id="no-type"),
    pytest.param({"type": "NOPE"}, ["type"], id="unknown-type"),
    pytest.param({"type": None}, ["type"], id="null-type"),
    pytest.param(
        {"type": "NOOP", "payload": {"sleep_ms": -1}},
        ["payload", "sleep_ms"],
        id="payload-negative-sleep",
    ),
    pytest.param(
        {"type": "NOOP", "payload": {"sleep_ms": "soon"}},
        ["payload", "sleep_ms"],
        id="payload-wrong-type",
    ),
    pytest.param({"type": "NOOP", "payload": {"bogus": 1}}, ["payload"], id="payload-unknown-key"),
    pytest.param({"type": "NOOP", "payload": [1]}, ["payload"], id="payload-not-object"),
    pytest.param({"type": "NOOP", "colour": "red"}, ["colour"], id="unknown-top-level-field"),
    pytest.param({"type": "NOOP", "priority": 10}, ["priority"], id="priority-10"),
    pytest.param({"type": "NOOP", "priority": -1}, ["priority"], id="priority-negative"),
    pytest.param({"type": "NOOP", "priority": "high"}, ["priority"], id="priority-text"),
    pytest.param(_over_max_retries, ["max_retries"], id="max-retries-over-limit"),
    pytest.param({"type": "NOOP", "max_retries": -1}, ["max_retries"], id="max-retries-negative"),
    pytest.param(_over_timeout, ["timeout_s"], id="timeout-over-max"),
    pytest.param({"type": "NOOP", "timeout_s": 0}, ["timeout_s"], id="timeout-zero"),
    pytest.param(
        {"type": "NOOP", "scheduled_at": "2999-01-01T00:00:00Z", "delay_ms": 10},
        ["delay_ms"],
        id="scheduled-at-and-delay",
    ),
    pytest.param({"type": "NOOP", "delay_ms": -1}, ["delay_ms"], id="delay-negative"),
    pytest.param(
        {"type": "NOOP", "scheduled_at": "tomorrow"}, ["scheduled_at"], id="scheduled-at-not-a-date"
    ),
    pytest.param({"type": "NOOP", "parent": "not-a-uuid"}, ["parent"], id="parent-not-uuid"),
    pytest.param(
        {"type": "NOOP", "idempotency_key": "k" * 256},
        ["idempotency_key"],
        id="idempotency-key-too-long",
    ),
    pytest.param(
        {"type": "NOOP", "retry_backoff_s": -1}, ["retry_backoff_s"], id="backoff-negative"
    ),
]


@pytest.mark.parametrize(("body", "path"), FIELD_CASES)
def test_invalid_field_answers_400_naming_it(api, settings, nothing_written, body, path):
    # given
    if callable(body):
        body = body(settings)

    # when
    response = api.post("/api/tasks/", body, format="json")

    # then the error sits under the field at fault, in DRF's nested shape
    assert response.status_code == 400, response.content
    errors: Any = response.json()
    for key in path:
        assert key in errors, f"{key!r} not in {errors}"
        errors = errors[key]
    assert errors  # a message, not an empty container


def test_unknown_payload_key_is_named_in_the_message(api, nothing_written):
    response = api.post("/api/tasks/", {"type": "NOOP", "payload": {"bogus": 1}}, format="json")

    assert response.status_code == 400
    assert "bogus" in json.dumps(response.json()["payload"])


def test_unknown_type_lists_the_known_ones(api, nothing_written):
    response = api.post("/api/tasks/", {"type": "NOPE"}, format="json")

    assert "NOOP" in response.json()["type"][0]


@pytest.mark.parametrize(
    ("header", "field"),
    [("k" * 256, "Idempotency-Key"), ("   ", "Idempotency-Key")],
    ids=["too-long", "blank"],
)
def test_invalid_idempotency_header_answers_400(api, nothing_written, header, field):
    response = api.post("/api/tasks/", {"type": "NOOP"}, format="json", HTTP_IDEMPOTENCY_KEY=header)

    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({}, ["tasks"], id="no-tasks"),
        pytest.param({"tasks": []}, ["tasks"], id="empty"),
        pytest.param({"tasks": {"type": "NOOP"}}, ["tasks"], id="not-a-list"),
        pytest.param({"tasks": [{"type": "NOOP"}], "extra": 1}, ["extra"], id="unknown-field"),
        pytest.param(
            {"tasks": [{"type": "NOOP", "idempotency_key": "k"}]},
            ["tasks", "0", "idempotency_key"],
            id="item-idempotency-key",
        ),
        pytest.param(
            {"tasks": [{"type": "NOOP"}, {"type": "NOOP", "priority": 10}]},
            ["tasks", "1", "priority"],
            id="item-priority",
        ),
    ],
)
def test_invalid_bulk_answers_400_naming_field(api, nothing_written, body, path):
    response = api.post("/api/tasks/bulk/", body, format="json")

    assert response.status_code == 400, response.content
    errors: Any = response.json()
    for key in path:
        assert key in errors, f"{key!r} not in {errors}"
        errors = errors[key]


# --- size and media type -----------------------------------------------------------------------


def _body_of(size: int) -> bytes:
    """A valid create body of exactly ``size`` bytes."""
    head, tail = b'{"type": "NOOP", "payload": {"result": "', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


@pytest.fixture
def small_limit(settings: LazySettings) -> int:
    settings.QW_MAX_PAYLOAD_BYTES = 2048
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    return 2048


def test_body_at_limit_is_accepted(api, small_limit):
    response = _post_raw(api, _body_of(small_limit))

    assert response.status_code == 201, response.content


def test_invalid_content_length_answers_400(api, nothing_written):
    response = _post_raw(api, _body_of(100), CONTENT_LENGTH="lots")

    assert response.status_code == 400
    assert "Content-Length" in response.json()["detail"]


def _wsgi_post_without_length(api, body: bytes) -> Any:
    """POST ``body`` as gunicorn presents a chunked request: no CONTENT_LENGTH, the de-chunked
    stream in ``wsgi.input`` and ``wsgi.input_terminated`` set."""
    return api.post(
        "/api/tasks/",
        body,
        content_type="application/json",
        CONTENT_LENGTH="",
        HTTP_TRANSFER_ENCODING="chunked",
        **{"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True},
    )


def test_chunked_body_within_limit_is_accepted_under_wsgi(api, small_limit):
    response = _wsgi_post_without_length(api, _body_of(small_limit - 10))

    assert response.status_code == 201, response.content


def _asgi_post_without_length(user, body: bytes) -> Any:
    """POST ``body`` through Django's ASGI test client with no Content-Length header."""
    token, _ = Token.objects.get_or_create(user=user)
    headers = [
        (b"host", b"testserver"),
        (b"content-type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
        (b"authorization", f"Token {token.key}".encode()),
    ]

    async def send() -> Any:
        return await AsyncClient().request(
            method="POST",
            path="/api/tasks/",
            headers=headers,
            query_string="",
            _body_file=FakePayload(body),
        )

    # async_to_sync runs the sync middleware and views back on this thread, in the test's
    # database transaction.
    return async_to_sync(send)()


def test_chunked_body_over_limit_answers_413_under_asgi(user, small_limit, nothing_written):
    response = _asgi_post_without_length(user, _body_of(small_limit * 2))

    assert response.status_code == 413
    assert "QW_MAX_PAYLOAD_BYTES" in json.loads(response.content)["detail"]


def test_chunked_body_within_limit_is_accepted_under_asgi(user, small_limit):
    before = Task.objects.count()

    response = _asgi_post_without_length(user, _body_of(small_limit - 10))

    assert response.status_code == 201, response.content
    assert Task.objects.count() == before + 1
