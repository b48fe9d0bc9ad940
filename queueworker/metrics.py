"""Metrics: the Prometheus exposition (``GET /metrics``) and the JSON figures of
``GET /api/metrics/``, each assembled from what the apps contribute.

The project package knows no app: each app registers, in its ``AppConfig.ready()``, a
Prometheus collector (``register_collector``) and a section of the JSON summary
(``register_summary``); the engine contributes the task figures, workflows the runs. This
module adds what is the project's own: the broker's figures and the scrape's token.

Nothing is counted in process memory, so the figures are the same whichever gunicorn worker
answers the scrape and whatever prefork child ran the task (each collector reads the database
at ``collect()`` time). The broker is read through ``queueworker.broker.queue_stats`` (bounded
in time); when it cannot be reached the scrape still answers, with ``queueworker_broker_up 0``
and no queue gauges.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.utils import timezone
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from queueworker import broker

PREFIX = "queueworker"

Summary = Callable[[AbstractBaseUser | AnonymousUser, datetime], dict[str, Any]]


def broker_families() -> Iterator[Metric]:
    """The broker's figures: up or not, and each declared queue's depth and consumers."""
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


def gauge(name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
    """A ``queueworker_<name>`` gauge with one label, one sample per key of ``values``."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class _Scrape:
    """Every figure, read at ``collect()`` time: the apps' collectors in the order they were
    registered, then the broker's."""

    def describe(self) -> list[Metric]:
        return []  # registering must not query anything

    def collect(self) -> Iterator[Metric]:
        for collector in _collectors:
            yield from collector.collect()
        yield from broker_families()


_collectors: list[Collector] = []
_summaries: list[Summary] = []
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(_Scrape())


def register_collector(collector: Collector) -> None:
    """Add an app's Prometheus collector to the scrape, once per class (``ready()`` may run
    more than once)."""
    if not any(type(known) is type(collector) for known in _collectors):
        _collectors.append(collector)


def register_summary(section: Summary) -> None:
    """Add an app's figures to ``GET /api/metrics/``: ``section(user, now)`` returns its keys
    of the answer, scoped to what ``user`` may see (everything for staff)."""
    if section not in _summaries:
        _summaries.append(section)


def summary(user: AbstractBaseUser | AnonymousUser, now: datetime | None = None) -> dict[str, Any]:
    """The figures of ``GET /api/metrics/``: the caller's own tasks and runs, all for staff."""
    now = now or timezone.now()
    figures: dict[str, Any] = {
        "scope": "all" if getattr(user, "is_staff", False) else "own",
        "generated_at": now,
    }
    for section in _summaries:
        figures.update(section(user, now))
    return figures


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
