"""Reads of the read-only API from a PostgreSQL replica, when ``DATABASE_REPLICA_URL`` is set.

A replica lags the primary, so only reads that can be a little stale go there: the safe-method
handlers (GET, HEAD, OPTIONS) of the API views that use ``ReplicaReadsMixin`` (task and run
lists and details, logs, metrics). Everything else reads the primary: authentication and
sessions, every write path, the state machine, workers, the dispatcher and the recovery sweep,
which must read their own writes. The router sends every write and every migration to the
primary, also for an object that was read from the replica.

A detail view that finds nothing on the replica asks the primary before answering 404, so a
client that polls the task it has just created never sees it missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

from django.conf import settings
from django.db import models
from django.http import Http404
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response

PRIMARY = "default"
REPLICA = "replica"

_read_replica: ContextVar[bool] = ContextVar("qw_read_replica", default=False)


def replica_configured() -> bool:
    return REPLICA in settings.DATABASES


@contextmanager
def reads_from(alias: str) -> Iterator[None]:
    """Route the reads made inside the block that name no database to ``alias``."""
    token = _read_replica.set(alias == REPLICA)
    try:
        yield
    finally:
        _read_replica.reset(token)


class PrimaryReplicaRouter:
    """Reads on the replica only inside ``reads_from(REPLICA)``; writes and migrations on the
    primary always."""

    def db_for_read(self, model: type[models.Model], **hints: Any) -> str | None:
        if _read_replica.get() and replica_configured():
            return REPLICA
        return None  # Django's default: the hinted instance's database, else the primary

    def db_for_write(self, model: type[models.Model], **hints: Any) -> str:
        return PRIMARY

    def allow_relation(self, obj1: models.Model, obj2: models.Model, **hints: Any) -> bool | None:
        if {obj1._state.db, obj2._state.db} <= {PRIMARY, REPLICA}:
            return True  # one database, two connections
        return None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return False if db == REPLICA else None


class ReplicaReadsMixin:
    """For a DRF view: its safe-method handlers read from the replica (when one is configured).

    The route starts after ``initial()`` (authentication, permissions, throttles: on the
    primary) and ends in ``finalize_response()``, which DRF calls for every response, errors
    included.
    """

    _replica_token: Token[bool] | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        if request.method in SAFE_METHODS and replica_configured():
            self._replica_token = _read_replica.set(True)

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        if self._replica_token is not None:
            _read_replica.reset(self._replica_token)
            self._replica_token = None
        return super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]

    def get_object(self) -> Any:
        try:
            return super().get_object()  # type: ignore[misc]
        except Http404:
            if not _read_replica.get():
                raise
            with reads_from(PRIMARY):  # not replicated yet: the primary knows
                return super().get_object()  # type: ignore[misc]
