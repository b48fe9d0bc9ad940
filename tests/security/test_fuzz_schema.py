"""Every operation of the live OpenAPI schema, fuzzed with schemathesis: no 5xx, no leak.

The schema is the one ``/api/schema/`` serves, loaded from the Django WSGI app when this module
is collected (it is open, docs/api.md; the test database does not exist yet then). Each operation is
one test, run as a user who owns a task, a workflow with a run and a schedule (as staff for the
staff-only operations); every call carries that user's token. A path id that parses as a UUID is
replaced by the id of the matching row, so fuzzed bodies and queries reach real objects;
malformed ids go as generated.

Schemathesis' coverage phase (boundary values, wrong types, missing fields, unexpected methods
and media types: every case the schema defines) and a few random examples per operation run
derandomized, with a fixed seed and no example database, against the test's PostgreSQL database.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from django.conf import settings
from django.core import signals
from django.db import close_old_connections
from django.urls import resolve
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from rest_framework.authtoken.models import Token
from rest_framework.permissions import IsAdminUser
from schemathesis.checks import not_a_server_error

from queueworker.wsgi import application
from tests.factories import UserFactory
from tests.security._world import World, build_world

MAX_EXAMPLES = 5

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 7,
        "generation": {"deterministic": True, "max-examples": MAX_EXAMPLES, "database": "none"},
        "operations": [
            {
                # A health check answers 503 naming the failing check (docs/api.md); none of the
                # tests' workers is running, so the full check fails on "workers".
                "include-path-regex": "^/api/health/",
                "checks": {"not_a_server_error": {"expected-statuses": ["2XX", "4XX", "503"]}},
            }
        ],
    }
)
SCHEMA = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application, config=CONFIG)

# What a response must never show: a traceback, a source path, an exception's class or a
# database error. Django answers a bare "Server Error (500)" page with DEBUG off; these catch a
# handler that formats an exception into the body instead.
LEAKS = [
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "[^"]+", line \d+'),
    re.compile(re.escape(str(settings.BASE_DIR))),
    re.compile(r"site-packages|dist-packages"),
    re.compile(r"<class '[\w.]+'>"),
    re.compile(r"\b(?:django|psycopg2?|rest_framework|celery|kombu|amqp|jsonschema)(?:\.\w+)+"),
    re.compile(
        r"\b(?:Key|Attribute|Type|Index|Name|Assertion|Runtime|Recursion|ZeroDivision|Lookup"
        r"|UnicodeDecode|UnicodeEncode|Integrity|Programming|Operational|Data|Database|Internal"
        r"|NotSupported|Protected|Restricted|Validation)Error\b"
    ),
    re.compile(r"\bDoesNotExist\b|matching query does not exist"),
    re.compile(r"\bSELECT\b.{1,300}?\bFROM\b|\bINSERT INTO\b|\bUPDATE\b.{1,300}?\bSET\b"),
]


def leaks_in(text: str) -> list[str]:
    """The fragments of ``text`` that expose the service's internals."""
    return [match.group(0) for pattern in LEAKS if (match := pattern.search(text))]


def _sent(value: Any) -> list[str]:
    """Every string the request carried (an error that quotes them back leaks nothing)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (*_sent(key), *_sent(item))]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _sent(item)]
    return []


def no_internal_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: the body shows no traceback, path, exception class or SQL of its
    own (text the request itself sent, quoted back in an error, does not count)."""
    text = response.text or ""
    sent = [case.path_parameters, case.query, getattr(case, "body", None)]
    for echoed in sorted(set(_sent(sent)), key=len, reverse=True):
        if len(echoed) >= 3:
            text = text.replace(echoed, "")
    found = leaks_in(text)
    if found:
        raise AssertionError(f"the response leaks internals: {found}")
    return None


def authenticated(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: the call was authenticated, so the fuzz reached the views."""
    if response.status_code == 401:
        raise AssertionError(f"401: the token did not apply: {response.text[:200]}")
    return None


@dataclass(frozen=True)
class FuzzWorld:
    world: World
    tokens: dict[str, str]


@pytest.fixture
def fuzz_world(db: Any, settings: Any) -> Iterator[FuzzWorld]:
    # As Django's test client does: a request must not close the test's connection, which holds
    # the test's transaction.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    settings.QW_HEALTH_TIMEOUT_S = 0.3  # the full health check waits this long for workers
    owner = UserFactory()
    staff = UserFactory(is_staff=True, is_superuser=True)
    tokens = {
        "owner": Token.objects.create(user=owner).key,
        "staff": Token.objects.create(user=staff).key,
    }
    try:
        yield FuzzWorld(build_world(owner), tokens)
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


def _role_for(operation: Any) -> str:
    """``staff`` for an operation whose view admits staff only, else ``owner``."""
    view = resolve(operation.path.replace("{id}", str(uuid.uuid4())).replace("{name}", "q")).func
    permissions = getattr(view, "initkwargs", {}).get("permission_classes")
    if permissions is None:
        permissions = getattr(getattr(view, "cls", None), "permission_classes", [])
    return "staff" if IsAdminUser in permissions else "owner"


def _use_real_ids(case: Any, fuzz: FuzzWorld) -> None:
    params = case.path_parameters or {}
    try:
        uuid.UUID(str(params.get("id")))
    except ValueError:
        return
    world, path = fuzz.world, case.operation.path
    kind = path.split("/")[2]
    if kind == "tasks":
        if path.endswith("/cancel/"):
            task = world.pending
        elif path.endswith(("/compensate/", "/result/")):
            task = world.completed
        else:
            task = world.failed
        params["id"] = str(task.pk)
    else:
        basename = {"workflows": "workflow", "workflow-runs": "workflow-run"}.get(kind, kind[:-1])
        params["id"] = world.id_for(basename)


@SCHEMA.parametrize()
@hypothesis_settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
def test_operation_answers_without_server_error_or_leak(case, fuzz_world):
    _use_real_ids(case, fuzz_world)
    token = fuzz_world.tokens[_role_for(case.operation)]

    case.call_and_validate(
        headers={"Authorization": f"Token {token}"},
        checks=[not_a_server_error, no_internal_details, authenticated],
    )


def test_schema_lists_the_operations_the_fuzz_needs():
    operations = [result.ok() for result in SCHEMA.get_all_operations()]
    labels = {operation.label for operation in operations}
    staff = {operation.label for operation in operations if _role_for(operation) == "staff"}

    assert len(labels) >= 30
    assert {"POST /api/tasks/", "DELETE /api/workflows/{id}/", "GET /api/health/"} <= labels
    assert staff == {
        "POST /api/queues/{name}/purge/",
        "POST /api/queues/dead-letter/redrive/",
        "GET /api/queues/dead-letter/messages/",
    }


# --- the leak check itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        'Traceback (most recent call last):\n  File "/x/y.py", line 3, in f',
        f"error in {settings.BASE_DIR}/tasks_app/services.py",
        "/usr/lib/python3.11/site-packages/django/db/models/query.py",
        "<class 'django.db.utils.IntegrityError'>",
        '{"detail": "django.db.utils.IntegrityError: duplicate key"}',
        '{"detail": "IntegrityError(\'duplicate key value\')"}',
        '{"detail": "KeyError: \'type\'"}',
        '{"detail": "Task matching query does not exist."}',
        '{"detail": "psycopg.errors.UniqueViolation"}',
        '{"detail": "SELECT \\"tasks_app_task\\".\\"id\\" FROM tasks_app_task WHERE id = 1"}',
    ],
)
def test_leak_check_flags_internals(body):
    assert leaks_in(body)


@pytest.mark.parametrize(
    "body",
    [
        '{"payload": {"sleep_ms": ["-1 is less than the minimum of 0"]}}',
        '{"detail": "JSON parse error - Expecting value: line 1 column 1 (char 0)"}',
        '{"detail": "Cannot delete it: it is referenced by 1 workflow run."}',
        '{"definition": ["steps.ship.next[0]: unknown step \'ghost\'"]}',
        '{"type": ["Unknown task type \'NOPE\'. Known types: NOOP."]}',
        '{"detail": "Authentication credentials were not provided."}',
    ],
)
def test_leak_check_passes_ordinary_errors(body):
    assert leaks_in(body) == []
