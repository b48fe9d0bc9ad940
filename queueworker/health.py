"""Health endpoints (DESIGN §7): open to all, bounded in time, 503 naming the failing check."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from queueworker.celery import app

BROKER_TIMEOUT_S = 1


def check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return connection.vendor


def check_broker() -> str:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
        return conn.as_uri()


def run_checks(checks: dict[str, Callable[[], str]]) -> tuple[bool, dict[str, Any]]:
    results: dict[str, Any] = {}
    healthy = True
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            detail, ok = check(), True
        except Exception as exc:  # a failing dependency is reported, not raised
            detail, ok = f"{type(exc).__name__}: {exc}", False
        healthy = healthy and ok
        results[name] = {
            "ok": ok,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "detail": detail,
        }
    return healthy, results


HealthOutput = inline_serializer(
    "HealthOutput",
    {
        "status": serializers.ChoiceField(choices=["ok", "unavailable"]),
        "failing": serializers.ListField(child=serializers.CharField()),
        "checks": serializers.DictField(),
    },
)


class _HealthBase(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []
    checks: dict[str, Callable[[], str]] = {}

    @extend_schema(responses={200: HealthOutput, 503: HealthOutput})
    def get(self, request: Request) -> Response:
        healthy, results = run_checks(self.checks)
        failing = [name for name, r in results.items() if not r["ok"]]
        body = {"status": "ok" if healthy else "unavailable", "failing": failing, "checks": results}
        return Response(body, status=200 if healthy else 503)


class LiveView(_HealthBase):
    """The process answers."""

    checks = {}


class ReadyView(_HealthBase):
    """Ready to serve: the database and the broker answer."""

    checks = {"database": check_database, "broker": check_broker}


class HealthView(_HealthBase):
    checks = {"database": check_database, "broker": check_broker}
