"""Health endpoints (docs/api.md): open to all, bounded in time, 503 naming the failing check.

The checks of one request run concurrently under one deadline (``QW_HEALTH_TIMEOUT_S``), so
the answer comes within it even when a dependency hangs; a check still running then is
reported failed ("timed out").

- ``/api/health/live/``: the process answers.
- ``/api/health/ready/``: the database and the broker answer, so this process can accept work.
  It also reports the dispatcher (which runs in every worker and beat, one at a time) under
  ``warnings`` when it has not run recently, without failing: readiness decides whether a web
  process gets traffic, and accepting tasks needs no dispatcher (the rows wait for it), so all
  workers being down must not take the API out of service as well.
- ``/api/health/``: those, plus workers (a Celery ping; and per queue, does any worker
  consume it?) and queues (none over ``QW_QUEUE_OVERLOAD_THRESHOLD``).

The checks of the apps are contributed (``register_check`` in their ``AppConfig.ready()``):
the dispatcher's is the engine's. A contributed check runs in ``/api/health/`` and, as its app
says, in ``ready/`` as well (failing it, or only warning); answers list the database and the
broker first, then the contributed checks in the order they were registered, then workers and
queues.

The endpoints are open, so what they tell and what they cost is bounded: anyone gets each
check's name and whether it passed; the details (hosts, URLs, worker names, error texts) only
staff users and callers with ``Authorization: Bearer <QW_METRICS_TOKEN>``. A process runs a set
of checks at most once per ``QW_HEALTH_CACHE_S`` and answers from that run meanwhile, so a
flood of requests sends at most one broadcast ping per interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from django.conf import settings
from django.db import connection, connections
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import exceptions, serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from queueworker import broker, metrics
from queueworker.celery import app

BROKER_TIMEOUT_S = 1
PING_TIMEOUT_S = 1.0


class CheckFailed(Exception):
    """A dependency answered, but not as it should."""


def check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return connection.vendor
    finally:
        connections.close_all()  # a thread's own connection; do not leave it open


def check_broker() -> str:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
        return conn.as_uri()


def check_workers() -> str:
    replies = _ping()
    workers = sorted(name for reply in replies for name in reply)
    if not workers:
        raise CheckFailed("no worker answered a ping")
    work_queues = [q.name for q in settings.CELERY_TASK_QUEUES]
    idle = [s.name for s in broker.queue_stats(work_queues) if s.consumers == 0]
    if idle:
        raise CheckFailed(f"no worker consumes {', '.join(idle)} ({len(workers)} answered)")
    return f"{len(workers)} answered: {', '.join(workers)}"


def _ping() -> list[dict[str, Any]]:
    """Celery's broadcast ping, once more on a new connection when the pooled one is gone: the
    broker closes connections (a restart, ``rabbitmqctl close_all_connections``, an idle
    timeout) and the pool finds out only when it next uses one."""
    with app.connection_for_write() as fresh:  # connects only if used
        try:
            return app.control.ping(timeout=PING_TIMEOUT_S) or []
        except fresh.connection_errors:
            return app.control.ping(timeout=PING_TIMEOUT_S, connection=fresh) or []


def check_queues() -> str:
    stats = broker.queue_stats()
    unknown = [s.name for s in stats if s.messages is None]
    if unknown:
        raise CheckFailed(f"cannot read {', '.join(unknown)}: {stats[0].error}")
    over = [f"{s.name} ({s.messages})" for s in stats if s.overloaded]
    if over:
        limit = settings.QW_QUEUE_OVERLOAD_THRESHOLD
        raise CheckFailed(f"over {limit} messages (QW_QUEUE_OVERLOAD_THRESHOLD): {', '.join(over)}")
    return ", ".join(f"{s.name}: {s.messages}" for s in stats)


Readiness = Literal["required", "advisory", "none"]


@dataclass(frozen=True)
class _Contributed:
    check: Callable[[], str]
    readiness: Readiness


_contributed: dict[str, _Contributed] = {}


def register_check(name: str, check: Callable[[], str], *, readiness: Readiness) -> None:
    """Add an app's check: always in ``/api/health/``; in ``ready/`` too unless ``readiness``
    is ``"none"``, where an ``"advisory"`` one is reported under ``warnings`` without failing
    the answer. ``check()`` returns a detail or raises; it runs in a thread of its own, so it
    closes any database connection it opened. Registering a name again replaces its check."""
    _contributed[name] = _Contributed(check, readiness)


def contributed_checks(*, ready: bool) -> dict[str, Callable[[], str]]:
    return {name: c.check for name, c in _contributed.items() if not ready or c.readiness != "none"}


def run_checks(checks: dict[str, Callable[[], str]]) -> tuple[bool, dict[str, Any]]:
    """Run ``checks`` at once; each reports ok, latency and detail by the deadline."""
    results: dict[str, Any] = {}
    if not checks:
        return True, results
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="health")
    started = time.perf_counter()
    futures = {name: pool.submit(_timed, check) for name, check in checks.items()}
    wait(futures.values(), timeout=settings.QW_HEALTH_TIMEOUT_S)
    pool.shutdown(wait=False, cancel_futures=True)  # a hung check must not hold the answer
    for name, future in futures.items():
        if future.done():
            results[name] = future.result()
        else:
            elapsed = round((time.perf_counter() - started) * 1000, 2)
            results[name] = {"ok": False, "latency_ms": elapsed, "detail": "timed out"}
    return all(r["ok"] for r in results.values()), results


class _RecentResults:
    """The last results of one set of checks, used for ``QW_HEALTH_CACHE_S`` after their run. A
    request that comes while the checks run waits for that run instead of starting another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: tuple[bool, dict[str, Any]] | None = None
        self._ran_at = 0.0

    def get(self, checks: dict[str, Callable[[], str]]) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            age = time.monotonic() - self._ran_at
            if self._results is None or age >= settings.QW_HEALTH_CACHE_S:
                self._results = run_checks(checks)
                self._ran_at = time.monotonic()
            return self._results


def _timed(check: Callable[[], str]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail, ok = check(), True
    except Exception as exc:  # a failing dependency is reported, not raised
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return {
        "ok": ok,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        "detail": detail,
    }


HealthOutput = inline_serializer(
    "HealthOutput",
    {
        "status": serializers.ChoiceField(choices=["ok", "unavailable"]),
        "failing": serializers.ListField(child=serializers.CharField()),
        "warnings": serializers.ListField(
            child=serializers.CharField(),
            help_text="Checks that failed without failing the answer (the dispatcher in ready/).",
        ),
        "checks": serializers.DictField(
            help_text="Per check {ok}; with latency_ms and detail for staff users and "
            "Authorization: Bearer <QW_METRICS_TOKEN>."
        ),
    },
)


def may_see_details(request: Request) -> bool:
    """Staff users, and callers with the metrics token (as ``/metrics`` checks it) when one is
    set. Bad credentials make the caller anonymous here rather than a 401: a probe that sends
    a stale token still learns whether the service is up."""
    if settings.QW_METRICS_TOKEN and metrics.token_accepted(
        request.headers.get("Authorization", "")
    ):
        return True
    try:
        return bool(request.user and request.user.is_staff)
    except exceptions.AuthenticationFailed:
        return False


class _HealthBase(APIView):
    permission_classes = [AllowAny]
    # A list of named checks: a subclass adds one by name.
    checks: dict[str, Callable[[], str]] = {}
    # Checks that are reported (under "warnings" when they fail) but do not fail the answer.
    advisory: frozenset[str] = frozenset()
    _recent: _RecentResults

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._recent = _RecentResults()

    def perform_authentication(self, request: Request) -> None:
        """Authenticate lazily, in ``may_see_details``: only to decide how much to show."""

    @extend_schema(responses={200: HealthOutput, 503: HealthOutput})
    def get(self, request: Request) -> Response:
        _, results = self._recent.get(self.checks)
        failing = [n for n, r in results.items() if not r["ok"] and n not in self.advisory]
        warnings = [n for n, r in results.items() if not r["ok"] and n in self.advisory]
        healthy = not failing
        if not may_see_details(request):
            results = {name: {"ok": r["ok"]} for name, r in results.items()}
        body = {
            "status": "ok" if healthy else "unavailable",
            "failing": failing,
            "warnings": warnings,
            "checks": results,
        }
        return Response(body, status=200 if healthy else 503)


class LiveView(_HealthBase):
    """The process answers."""

    checks = {}


class ReadyView(_HealthBase):
    """Ready to accept work: the database and the broker answer; the dispatcher is reported."""

    @property
    def checks(self) -> dict[str, Callable[[], str]]:  # type: ignore[override]
        return {
            "database": check_database,
            "broker": check_broker,
            **contributed_checks(ready=True),
        }

    @property
    def advisory(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(n for n, c in _contributed.items() if c.readiness == "advisory")


class HealthView(_HealthBase):
    """Every dependency: database, broker, workers (and which queues have none), queues."""

    @property
    def checks(self) -> dict[str, Callable[[], str]]:  # type: ignore[override]
        return {
            "database": check_database,
            "broker": check_broker,
            **contributed_checks(ready=False),
            "workers": check_workers,
            "queues": check_queues,
        }
