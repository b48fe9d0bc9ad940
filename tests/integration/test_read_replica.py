"""DATABASE_REPLICA_URL: the read-only API reads the replica, every other path the primary.

The replica is a second database on the local server: a copy of the test database taken during
the test (a replica that stopped replaying there), plus a row written to it alone. Whatever the
API lists that the primary does not hold came from the replica; whatever a write or a worker
made after the copy is on the primary alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from django.db import connection, connections
from psycopg import sql
from rest_framework.authtoken.models import Token

from tasks_app.models import Task, TaskStatus
from tests.chaos.harness import Services
from tests.conftest import Proc, child_database_url, wait_for
from tests.factories import TaskFactory, UserFactory

pytestmark = pytest.mark.integration


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(os.environ["QW_TEST_DATABASE_URL"], autocommit=True)


@pytest.fixture
def take_replica(transactional_db: Any) -> Iterator[Callable[[], str]]:
    """Copy the test database now (CREATE DATABASE … TEMPLATE); its URL. Dropped at the end."""
    name = f"{connection.settings_dict['NAME']}_replica"

    def take() -> str:
        connections.close_all()  # a template database must have no other session
        with _admin() as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(connection.settings_dict["NAME"])
                )
            )
        return urlunsplit(urlsplit(child_database_url())._replace(path=f"/{name}"))

    yield take
    with _admin() as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    started = Services(tmp_path)
    yield started
    started.stop_all()


def _replica_only_task(replica_url: str, like: str) -> str:
    """Insert into the replica alone a CANCELLED copy of task ``like``; its id."""
    with psycopg.connect(replica_url, autocommit=True) as replica:
        replica.execute("CREATE TEMP TABLE t AS SELECT * FROM tasks_app_task WHERE id = %s", [like])
        row = replica.execute(
            "UPDATE t SET id = gen_random_uuid(), status = 'CANCELLED', finished_at = now() "
            "RETURNING id"
        ).fetchone()
        assert row is not None
        replica.execute("INSERT INTO tasks_app_task SELECT * FROM t")
        return str(row[0])


def _on_replica(replica_url: str, task_id: str) -> bool:
    with psycopg.connect(replica_url) as replica:
        found = replica.execute("SELECT 1 FROM tasks_app_task WHERE id = %s", [task_id])
        return found.fetchone() is not None


def test_read_api_reads_replica_while_writes_and_workers_use_primary(
    take_replica: Callable[[], str],
    services: Services,
    spawn: Callable[..., Proc],
) -> None:
    # given a user with a task, a replica copied from the primary, and a task on the replica alone
    user = UserFactory()
    token = Token.objects.create(user=user).key
    shared = str(TaskFactory(owner=user).id)
    replica_url = take_replica()
    replica_only = _replica_only_task(replica_url, like=shared)
    # and gunicorn and a worker configured with the replica
    web = services.web(token=token, workers=1, DATABASE_REPLICA_URL=replica_url)
    spawn("worker", DATABASE_REPLICA_URL=replica_url)
    http = web.session()

    # when the read-only API is asked
    listed = http.get(f"{web.base}/api/tasks/", timeout=10)
    detail = http.get(f"{web.base}/api/tasks/{replica_only}/", timeout=10)
    logs = http.get(f"{web.base}/api/tasks/{replica_only}/logs/", timeout=10)
    metrics = http.get(f"{web.base}/api/metrics/", timeout=10)

    # then it answers from the replica, with the row the primary does not hold
    assert listed.status_code == 200, listed.text
    assert {t["id"] for t in listed.json()["results"]} == {shared, replica_only}
    assert (detail.status_code, detail.json()["status"]) == (200, "CANCELLED")
    assert logs.status_code == 200
    assert metrics.json()["tasks"]["by_status"]["CANCELLED"] == 1
    assert not Task.objects.filter(pk=replica_only).exists()

    # when a write names the replica's row, it is looked up on the primary
    assert http.post(f"{web.base}/api/tasks/{replica_only}/cancel/", timeout=10).status_code == 404

    # when a task is created, it is written to the primary and the worker runs it from there
    created = http.post(f"{web.base}/api/tasks/", json={"type": "NOOP"}, timeout=10)
    assert created.status_code == 201, created.text
    new = created.json()["id"]
    wait_for(lambda: Task.objects.filter(pk=new, status=TaskStatus.COMPLETED).exists(), timeout=30)
    assert not _on_replica(replica_url, new)

    # then the list, read on the replica, does not show it yet, while its detail page falls back
    # to the primary rather than answer 404 to the client that has just created it
    listed = http.get(f"{web.base}/api/tasks/", timeout=10)
    assert new not in {t["id"] for t in listed.json()["results"]}
    detail = http.get(f"{web.base}/api/tasks/{new}/", timeout=10)
    assert (detail.status_code, detail.json()["status"]) == (200, "COMPLETED")
