"""The primary/replica router: which reads may go to the replica, and nothing else does."""

from __future__ import annotations

from typing import Any

import pytest

from queueworker import db_router
from queueworker.db_router import PRIMARY, REPLICA, PrimaryReplicaRouter, reads_from
from tasks_app.models import Task

router = PrimaryReplicaRouter()


@pytest.fixture
def with_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db_router, "replica_configured", lambda: True)


def test_reads_outside_a_replica_block_use_django_default(with_replica):
    assert router.db_for_read(Task) is None


def test_reads_inside_a_replica_block_go_to_replica(with_replica):
    with reads_from(REPLICA):
        assert router.db_for_read(Task) == REPLICA
        with reads_from(PRIMARY):
            assert router.db_for_read(Task) is None
        assert router.db_for_read(Task) == REPLICA
    assert router.db_for_read(Task) is None


def test_replica_block_without_replica_configured_reads_primary():
    with reads_from(REPLICA):
        assert router.db_for_read(Task) is None


def test_writes_go_to_primary_even_for_an_object_read_from_the_replica(with_replica):
    task = Task()
    task._state.db = REPLICA
    with reads_from(REPLICA):
        assert router.db_for_write(Task, instance=task) == PRIMARY


def test_migrations_never_run_on_replica():
    assert router.allow_migrate(REPLICA, "tasks_app", model_name="task") is False
    assert router.allow_migrate(PRIMARY, "tasks_app", model_name="task") is None


def test_relations_between_primary_and_replica_objects_allowed():
    a, b, other = Task(), Task(), Task()
    a._state.db, b._state.db, other._state.db = PRIMARY, REPLICA, "elsewhere"
    assert router.allow_relation(a, b) is True
    assert router.allow_relation(a, other) is None


class _View:
    """The DRF calls ``ReplicaReadsMixin`` wraps, recording where reads would go."""

    def initial(self, request: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def finalize_response(self, request: Any, response: Any, *args: Any, **kwargs: Any) -> Any:
        return response


class _ReadView(db_router.ReplicaReadsMixin, _View):
    pass


class _Request:
    def __init__(self, method: str) -> None:
        self.method = method


@pytest.mark.parametrize(("method", "expected"), [("GET", REPLICA), ("POST", None)])
def test_mixin_routes_safe_methods_only_until_response(with_replica, method, expected):
    view, request = _ReadView(), _Request(method)

    view.initial(request)
    during = router.db_for_read(Task)
    view.finalize_response(request, "response")

    assert during == expected
    assert router.db_for_read(Task) is None
