"""Prometheus exposition (``GET /metrics``): one collector that reads the database and the
broker at scrape time.

Nothing is counted in process memory, so the figures are the same whichever gunicorn worker
answers the scrape and whatever prefork child ran the task; the counters are derived from the
task table (created = rows, started = ``started_at`` set, completed/failed = status, retried =
the sum of ``retries``). A task sent back to PENDING by a retry or a redrive leaves FAILED and
has its ``retries`` reset, so ``failed_total`` and ``retried_total`` may dip: ``rate()`` reads a
dip as a counter reset (see README "Metrics").

The broker is read through ``queueworker.broker.queue_stats`` (bounded in time); when it
cannot be reached the scrape still answers, with ``queueworker_broker_up 0`` and no queue
gauges.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from django.conf import settings
from django.utils import timezone
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from queueworker import broker
from tasks_app import metrics as aggregates
from tasks_app.handlers.registry import registry as handlers
from tasks_app.models import DeadLetterMessage, Task
from workflows_app.models import WorkflowRun

PREFIX = "queueworker"

# queueworker_tasks_<name>_total -> its help
_TASK_COUNTERS = {
    "created": "Tasks created (rows of the task table).",
    "started": "Tasks claimed by a worker at least once (started_at set).",
    "completed": "Tasks that are COMPLETED.",
    "failed": "Tasks that are FAILED (dead letters); a redrive or retry takes one out.",
    "retried": "Retries of the tasks (the sum of their retries; reset by a redrive or retry).",
}


class QueueWorkerCollector:
    """Reads every figure at ``collect()`` time: six grouped database queries and the broker."""

    def describe(self) -> list[Metric]:
        return []  # registering must not query anything

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        tasks = Task.objects.all()
        yield from self._task_families(aggregates.task_groups(tasks))
        yield self._duration_histogram(aggregates.duration_histogram(tasks))
        yield _gauge(
            "dead_letters",
            "Dead letters by failure_class: FAILED tasks, and the messages workers refused.",
            "failure_class",
            aggregates.dead_letters(tasks, DeadLetterMessage.objects.all()),
        )
        yield _gauge(
            "workflow_runs",
            "Workflow runs by status.",
            "status",
            aggregates.run_counts(WorkflowRun.objects.all()),
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_pending_age_seconds",
            "How long the oldest due PENDING/RETRYING task has waited since it was due.",
        )
        oldest.add_metric([], aggregates.oldest_waiting_age_s(tasks, now))
        yield oldest
        yield from self._broker_families()

    def _task_families(self, groups: list[aggregates.TaskGroup]) -> Iterator[Metric]:
        # Every registered type appears (at 0) on its configured queue, so series never vanish.
        zero = {"created": 0, "started": 0, "completed": 0, "failed": 0, "retried": 0}
        totals: dict[tuple[str, str], dict[str, int]] = {
            (task_type, _queue_of(task_type)): dict(zero) for task_type in handlers.types()
        }
        by_status: dict[tuple[str, str], dict[str, int]] = {
            key: dict.fromkeys(aggregates.STATUSES, 0) for key in totals
        }
        compensations = dict.fromkeys(aggregates.STATUSES, 0)
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
            statuses = by_status.setdefault(key, dict.fromkeys(aggregates.STATUSES, 0))
            statuses[group.status] = statuses.get(group.status, 0) + group.count
            if group.type == aggregates.COMPENSATION:
                compensations[group.status] = compensations.get(group.status, 0) + group.in_run
        for name, documentation in _TASK_COUNTERS.items():
            counter = CounterMetricFamily(
                f"{PREFIX}_tasks_{name}", documentation, labels=["type", "queue"]
            )
            for (task_type, queue), row in sorted(totals.items()):
                counter.add_metric([task_type, queue], row[name])
            yield counter
        gauge = GaugeMetricFamily(
            f"{PREFIX}_tasks", "Tasks by status now.", labels=["type", "queue", "status"]
        )
        for (task_type, queue), statuses in sorted(by_status.items()):
            for status, count in statuses.items():
                gauge.add_metric([task_type, queue, status], count)
        yield gauge
        yield _gauge(
            "compensations",
            "Compensation tasks of workflow runs (sagas) by status.",
            "status",
            compensations,
        )

    def _duration_histogram(self, histograms: dict[str, aggregates.Histogram]) -> Metric:
        family = HistogramMetricFamily(
            f"{PREFIX}_task_duration_seconds",
            "finished_at - started_at of COMPLETED tasks (from the first claim, retries included).",
            labels=["type"],
        )
        empty = aggregates.Histogram((0,) * len(aggregates.DURATION_BUCKETS), 0, 0.0)
        for task_type in sorted(set(handlers.types()) | set(histograms)):
            histogram = histograms.get(task_type, empty)
            buckets: list[tuple[str, float]] = [
                (floatToGoString(bound), count)
                for bound, count in zip(aggregates.DURATION_BUCKETS, histogram.buckets, strict=True)
            ]
            buckets.append(("+Inf", histogram.count))
            family.add_metric([task_type], buckets, histogram.sum_s)
        return family

    def _broker_families(self) -> Iterator[Metric]:
        stats = broker.queue_stats()
        up = GaugeMetricFamily(f"{PREFIX}_broker_up", "1 if the broker answered this scrape.")
        up.add_metric([], 1 if broker.reachable(stats) else 0)
        yield up
        if not broker.reachable(stats):
            return
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_messages", "Messages ready in a declared queue.", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            f"{PREFIX}_queue_consumers", "Consumers of a declared queue.", labels=["queue"]
        )
        for queue in stats:
            if queue.messages is not None:
                depth.add_metric([queue.name], queue.messages)
            if queue.consumers is not None:  # unknown on the embedded file-based transport
                consumers.add_metric([queue.name], queue.consumers)
        yield depth
        if not settings.IS_EMBEDDED_BROKER:
            yield consumers


def _queue_of(task_type: str) -> str:
    return str(settings.QW_TYPE_ROUTES.get(task_type, settings.CELERY_TASK_DEFAULT_QUEUE))


def _gauge(name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(QueueWorkerCollector())


def exposition(accept: str) -> tuple[bytes, str]:
    """The scrape's body and content type (OpenMetrics when the scraper asks for it)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


def token_accepted(authorization: str) -> bool:
    """True when ``QW_METRICS_TOKEN`` is unset, or the header is ``Bearer <that token>``."""
    expected = settings.QW_METRICS_TOKEN
    if not expected:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), expected.encode()
    )
