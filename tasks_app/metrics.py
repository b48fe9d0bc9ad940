"""Aggregates over tasks, for ``GET /api/metrics/`` and ``GET /metrics``: the engine's
contribution to the project's metrics (``queueworker.metrics``), registered by
``TasksAppConfig.ready()`` as the section ``task_summary`` and the collector ``TaskCollector``.

Each figure is one aggregate query, one pass over a table or an index; nothing is counted in
process memory, so every web process answers the same whatever ran where:

1. ``task_groups``: tasks grouped by (type, queue, status), with the started ones, their
   retries and the saga compensations (one scan of ``tasks_app_task``);
2. ``window_figures``: completions, failures and retries over the last 1/5/15 minutes
   (``finished_at`` in the widest window; one query for the three windows);
3. ``duration_percentiles``: p50/p95/p99 of ``finished_at - started_at`` per type over the
   tasks COMPLETED in the last 15 minutes (PostgreSQL's ``percentile_cont``, all three from one
   sort; computed in Python on SQLite, the embedded demo mode);
4. ``duration_histogram``: per type, completed tasks under each bucket bound
   (``COUNT(*) FILTER`` per bucket, one scan);
5. ``dead_letters``: FAILED tasks by ``failure_class`` (the partial index ``task_dead_letter``),
   and the refused messages recorded from ``tasks.dead_letter``;
6. ``oldest_waiting_age_s``: the oldest due PENDING/RETRYING task (the partial index
   ``task_waiting_due``).

Workflow runs are counted by ``workflows_app.metrics``. Compensations stay here: they are
COMPENSATION tasks with a run, counted by the same scan as every task group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from django.db.models import (
    Aggregate,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Func,
    Min,
    Q,
    QuerySet,
    Sum,
)
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from queueworker.metrics import PREFIX, gauge
from tasks_app.handlers.registry import registry as handlers
from tasks_app.models import DeadLetterMessage, FailureClass, Task, TaskStatus
from tasks_app.selectors import task_queryset
from tasks_app.task_types import TaskType

WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900}
PERCENTILE_WINDOW_S = 900
PERCENTILES: dict[str, float] = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
# Upper bounds (seconds) of the duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip
STATUSES: tuple[str, ...] = tuple(TaskStatus.values)
FAILURE_CLASSES: tuple[str, ...] = tuple(FailureClass.values)
COMPENSATION = TaskType.COMPENSATION

_DURATION = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())


@dataclass(frozen=True)
class TaskGroup:
    """Tasks of one (type, queue, status)."""

    type: str
    queue: str
    status: str
    count: int
    started: int  # with started_at set: claimed at least once
    retries: int  # the sum of their ``retries``
    in_run: int  # with a workflow run (for COMPENSATION: a saga's compensations)


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per bucket bound (``DURATION_BUCKETS``), with the total and the sum."""

    buckets: tuple[int, ...]
    count: int
    sum_s: float


def task_groups(tasks: QuerySet[Task]) -> list[TaskGroup]:
    rows = (
        tasks.order_by()
        .values("type", "queue", "status")
        .annotate(
            n=Count("*"),
            started=Count("started_at"),
            retries=Sum("retries"),
            in_run=Count("workflow_run"),
        )
    )
    return [
        TaskGroup(
            type=row["type"],
            queue=row["queue"],
            status=row["status"],
            count=row["n"],
            started=row["started"],
            retries=row["retries"] or 0,
            in_run=row["in_run"],
        )
        for row in rows
    ]


def window_figures(tasks: QuerySet[Task], now: datetime) -> dict[str, dict[str, Any]]:
    """Per window: finished tasks by outcome, their retries, throughput, error and retry rate.

    ``finished`` counts every task that reached a terminal status in the window (COMPLETED,
    FAILED or CANCELLED); ``error_rate`` is FAILED / finished and ``retry_rate`` is the retries
    of those tasks / finished, both null when nothing finished.
    """
    aggregates: dict[str, Any] = {}
    for key, seconds in WINDOWS.items():
        recent = Q(finished_at__gte=now - timedelta(seconds=seconds))
        aggregates[f"finished_{key}"] = Count("id", filter=recent)
        aggregates[f"completed_{key}"] = Count("id", filter=recent & Q(status=TaskStatus.COMPLETED))
        aggregates[f"failed_{key}"] = Count("id", filter=recent & Q(status=TaskStatus.FAILED))
        aggregates[f"cancelled_{key}"] = Count("id", filter=recent & Q(status=TaskStatus.CANCELLED))
        aggregates[f"retries_{key}"] = Sum("retries", filter=recent)
    widest = now - timedelta(seconds=max(WINDOWS.values()))
    totals = tasks.order_by().filter(finished_at__gte=widest).aggregate(**aggregates)
    figures: dict[str, dict[str, Any]] = {}
    for key, seconds in WINDOWS.items():
        finished = totals[f"finished_{key}"]
        retries = totals[f"retries_{key}"] or 0
        figures[key] = {
            "window_s": seconds,
            "finished": finished,
            "completed": totals[f"completed_{key}"],
            "failed": totals[f"failed_{key}"],
            "cancelled": totals[f"cancelled_{key}"],
            "retries": retries,
            "throughput_per_s": totals[f"completed_{key}"] / seconds,
            "error_rate": totals[f"failed_{key}"] / finished if finished else None,
            "retry_rate": retries / finished if finished else None,
        }
    return figures


class _PercentilesCont(Aggregate):
    """PostgreSQL's ``percentile_cont(ARRAY[…]) WITHIN GROUP (ORDER BY …)``: several
    continuous percentiles from one sort, as a ``float8[]`` in the order of ``fractions``."""

    function = "percentile_cont"
    template = "%(function)s(%(fractions)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: Any, fractions: Sequence[float]) -> None:
        from django.contrib.postgres.fields import ArrayField

        literal = "ARRAY[" + ", ".join(repr(float(f)) for f in fractions) + "]::float8[]"
        super().__init__(expression, fractions=literal, output_field=ArrayField(FloatField()))


def _epoch_seconds(expression: Any) -> Func:
    return Func(expression, template="EXTRACT(EPOCH FROM %(expressions)s)::float8")


def duration_percentiles(
    tasks: QuerySet[Task], now: datetime, *, use_sql: bool | None = None
) -> dict[str, dict[str, Any]]:
    """Per type: ``{count, p50, p95, p99}`` in seconds over the tasks COMPLETED in the last
    ``PERCENTILE_WINDOW_S``; types without such tasks are left out.

    ``use_sql`` defaults to PostgreSQL's ``percentile_cont``; the Python path (SQLite) reads
    the durations and interpolates the same way.
    """
    recent = tasks.order_by().filter(
        status=TaskStatus.COMPLETED,
        finished_at__gte=now - timedelta(seconds=PERCENTILE_WINDOW_S),
        started_at__isnull=False,
    )
    if use_sql is None:
        use_sql = connection.vendor == "postgresql"
    if use_sql:
        rows = recent.values("type").annotate(
            n=Count("*"),
            cuts=_PercentilesCont(
                _epoch_seconds(F("finished_at") - F("started_at")), list(PERCENTILES.values())
            ),
        )
        return {
            row["type"]: {"count": row["n"], **dict(zip(PERCENTILES, row["cuts"], strict=True))}
            for row in rows
        }
    durations: dict[str, list[float]] = defaultdict(list)
    for task_type, duration in recent.annotate(duration=_DURATION).values_list("type", "duration"):
        durations[task_type].append(duration.total_seconds())
    return {
        task_type: {
            "count": len(values),
            **{name: percentile_cont(values, f) for name, f in PERCENTILES.items()},
        }
        for task_type, values in durations.items()
    }


def percentile_cont(values: Iterable[float], fraction: float) -> float:
    """PostgreSQL's ``percentile_cont``: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def duration_histogram(
    tasks: QuerySet[Task], bounds: Sequence[float] = DURATION_BUCKETS
) -> dict[str, Histogram]:
    """Per type, over every COMPLETED task: how many took at most each bound, in one scan."""
    aggregates: dict[str, Any] = {
        f"le_{i}": Count("id", filter=Q(duration__lte=timedelta(seconds=bound)))
        for i, bound in enumerate(bounds)
    }
    rows: Iterable[Mapping[str, Any]] = (
        tasks.order_by()
        .filter(status=TaskStatus.COMPLETED, started_at__isnull=False)
        .alias(duration=_DURATION)
        .values("type")
        .annotate(n=Count("*"), total=Sum("duration"), **aggregates)
    )
    return {
        row["type"]: Histogram(
            buckets=tuple(row[f"le_{i}"] for i in range(len(bounds))),
            count=row["n"],
            sum_s=row["total"].total_seconds() if row["total"] is not None else 0.0,
        )
        for row in rows
    }


def dead_letters(
    tasks: QuerySet[Task], messages: QuerySet[DeadLetterMessage] | None = None
) -> dict[str, int]:
    """Dead letters by ``failure_class``, every class present (0 when none): FAILED tasks, and
    the refused messages recorded from ``tasks.dead_letter`` (``invalid_message``,
    ``poison_message``) when ``messages`` is given."""
    counts = dict.fromkeys(FAILURE_CLASSES, 0)
    rows: list[Mapping[str, Any]] = list(
        tasks.order_by()
        .filter(status=TaskStatus.FAILED)
        .values("failure_class")
        .annotate(n=Count("*"))
    )
    if messages is not None:
        rows += messages.order_by().values("failure_class").annotate(n=Count("*"))
    for row in rows:
        key = row["failure_class"] or "unknown"
        counts[key] = counts.get(key, 0) + row["n"]
    return counts


def oldest_waiting_age_s(tasks: QuerySet[Task], now: datetime) -> float:
    """Seconds the oldest due PENDING/RETRYING task has waited since it was due (its
    ``next_attempt_at``, else its creation); 0 when none waits."""
    oldest = (
        tasks.order_by()
        .filter(status__in=(TaskStatus.PENDING, TaskStatus.RETRYING))
        .aggregate(
            due=Min("next_attempt_at", filter=Q(next_attempt_at__lte=now)),
            unscheduled=Min("created_at", filter=Q(next_attempt_at__isnull=True)),
        )
    )
    since = [moment for moment in oldest.values() if moment is not None]
    return max(0.0, (now - min(since)).total_seconds()) if since else 0.0


def task_summary(user: AbstractBaseUser | AnonymousUser, now: datetime) -> dict[str, Any]:
    """The engine's figures of ``GET /api/metrics/``: the caller's own tasks, all for staff."""
    tasks = task_queryset(user)
    by_status = dict.fromkeys(STATUSES, 0)
    by_type: dict[str, int] = defaultdict(int)
    by_type_status: dict[str, dict[str, int]] = {}
    compensations = dict.fromkeys(STATUSES, 0)
    for group in task_groups(tasks):
        by_status[group.status] = by_status.get(group.status, 0) + group.count
        by_type[group.type] += group.count
        per_type = by_type_status.setdefault(group.type, dict.fromkeys(STATUSES, 0))
        per_type[group.status] = per_type.get(group.status, 0) + group.count
        if group.type == COMPENSATION:
            compensations[group.status] = compensations.get(group.status, 0) + group.in_run
    staff = bool(getattr(user, "is_staff", False))
    # Refused messages have no owner: staff only, as at /api/queues/dead-letter/messages/.
    letters = dead_letters(tasks, DeadLetterMessage.objects.all() if staff else None)
    return {
        "tasks": {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_type": dict(sorted(by_type.items())),
            "by_type_status": dict(sorted(by_type_status.items())),
        },
        "windows": window_figures(tasks, now),
        "durations": {
            "window_s": PERCENTILE_WINDOW_S,
            "by_type": dict(sorted(duration_percentiles(tasks, now).items())),
        },
        "dead_letters": {"total": sum(letters.values()), "by_failure_class": letters},
        "oldest_pending_age_s": oldest_waiting_age_s(tasks, now),
        "compensations": {"by_status": compensations},
    }


# --- the Prometheus exposition -----------------------------------------------------------------

# queueworker_tasks_<name>_total -> its help
_TASK_COUNTERS = {
    "created": "Tasks created (rows of the task table).",
    "started": "Tasks claimed by a worker at least once (started_at set).",
    "completed": "Tasks that are COMPLETED.",
    "failed": "Tasks that are FAILED (dead letters); a redrive or retry takes one out.",
    "retried": "Retries of the tasks (the sum of their retries; reset by a redrive or retry).",
}


class TaskCollector:
    """The task figures of ``GET /metrics``, read at ``collect()`` time: five grouped queries.

    The counters are derived from the task table (created = rows, started = ``started_at``
    set, completed/failed = status, retried = the sum of ``retries``). A task sent back to
    PENDING by a retry or a redrive leaves FAILED and has its ``retries`` reset, so
    ``failed_total`` and ``retried_total`` may dip: ``rate()`` reads a dip as a counter reset
    (see README "Metrics").
    """

    def describe(self) -> list[Metric]:
        return []  # registering must not query anything

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        tasks = Task.objects.all()
        yield from self._task_families(task_groups(tasks))
        yield self._duration_histogram(duration_histogram(tasks))
        yield gauge(
            "dead_letters",
            "Dead letters by failure_class: FAILED tasks, and the messages workers refused.",
            "failure_class",
            dead_letters(tasks, DeadLetterMessage.objects.all()),
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_age_seconds",
            "How long the oldest due PENDING/RETRYING task has waited since it was due.",
        )
        oldest.add_metric([], oldest_waiting_age_s(tasks, now))
        yield oldest

    def _task_families(self, groups: list[TaskGroup]) -> Iterator[Metric]:
        # Every registered type appears (at 0) on its configured queue, so series never vanish.
        zero = {"created": 0, "started": 0, "completed": 0, "failed": 0, "retried": 0}
        totals: dict[tuple[str, str], dict[str, int]] = {
            (task_type, _queue_of(task_type)): dict(zero) for task_type in handlers.types()
        }
        by_status: dict[tuple[str, str], dict[str, int]] = {
            key: dict.fromkeys(STATUSES, 0) for key in totals
        }
        compensations = dict.fromkeys(STATUSES, 0)
        for group in groups:
            key = (group.type, group.queue)
            row = totals.setdefault(key, dict(zero))
            row["created"] += group.count
            row["started"] += group.started
            row["retried"] += group.retries
            if group.status == "COMPLETED":
                row["completed"] += group.count
            elif group.status == "FAILED":
                row["failed"] += group.count
            statuses = by_status.setdefault(key, dict.fromkeys(STATUSES, 0))
            statuses[group.status] = statuses.get(group.status, 0) + group.count
            if group.type == COMPENSATION:
                compensations[group.status] = compensations.get(group.status, 0) + group.in_run
        for name, documentation in _TASK_COUNTERS.items():
            counter = CounterMetricFamily(
                f"{PREFIX}_tasks_{name}", documentation, labels=["type", "queue"]
            )
            for (task_type, queue), row in sorted(totals.items()):
                counter.add_metric([task_type, queue], row[name])
            yield counter
        now_by_status = GaugeMetricFamily(
            f"{PREFIX}_tasks", "Tasks by status now.", labels=["type", "queue", "status"]
        )
        for (task_type, queue), statuses in sorted(by_status.items()):
            for status, count in statuses.items():
                now_by_status.add_metric([task_type, queue, status], count)
        yield now_by_status
        yield gauge(
            "compensations",
            "Compensation tasks of workflow runs (sagas) by status.",
            "status",
            compensations,
        )

    def _duration_histogram(self, histograms: dict[str, Histogram]) -> Metric:
        family = HistogramMetricFamily(
            f"{PREFIX}_task_duration_seconds",
            "finished_at - started_at of COMPLETED tasks (from the first claim, retries included).",
            labels=["type"],
        )
        empty = Histogram((0,) * len(DURATION_BUCKETS), 0, 0.0)
        for task_type in sorted(set(handlers.types()) | set(histograms)):
            histogram = histograms.get(task_type, empty)
            buckets: list[tuple[str, float]] = [
                (floatToGoString(bound), count)
                for bound, count in zip(DURATION_BUCKETS, histogram.buckets, strict=True)
            ]
            buckets.append(("+Inf", histogram.count))
            family.add_metric([task_type], buckets, histogram.sum_s)
        return family


def _queue_of(task_type: str) -> str:
    return str(settings.QW_TYPE_ROUTES.get(task_type, settings.CELERY_TASK_DEFAULT_QUEUE))
