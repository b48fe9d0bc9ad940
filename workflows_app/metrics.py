"""Workflows' contribution to the project's metrics (``queueworker.metrics``): runs by status,
in ``GET /api/metrics/`` (the caller's own runs, all for staff) and ``GET /metrics``
(``queueworker_workflow_runs``). ``WorkflowsAppConfig.ready()`` registers both; one grouped
query each."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, QuerySet
from prometheus_client.core import Metric

from queueworker.metrics import gauge
from workflows_app.models import RunStatus, WorkflowRun
from workflows_app.selectors import run_queryset

RUN_STATUSES: tuple[str, ...] = tuple(RunStatus.values)


def run_counts(runs: QuerySet[WorkflowRun]) -> dict[str, int]:
    """Workflow runs by status, every status present."""
    counts = dict.fromkeys(RUN_STATUSES, 0)
    for row in runs.order_by().values("status").annotate(n=Count("*")):
        counts[row["status"]] = row["n"]
    return counts


def run_summary(user: AbstractBaseUser | AnonymousUser, now: datetime) -> dict[str, Any]:
    """Workflows' figures of ``GET /api/metrics/``: the caller's runs by status."""
    return {"workflow_runs": {"by_status": run_counts(run_queryset(user))}}


class RunCollector:
    """``queueworker_workflow_runs{status}``, read at ``collect()`` time."""

    def describe(self) -> list[Metric]:
        return []  # registering must not query anything

    def collect(self) -> Iterator[Metric]:
        yield gauge(
            "workflow_runs",
            "Workflow runs by status.",
            "status",
            run_counts(WorkflowRun.objects.all()),
        )
