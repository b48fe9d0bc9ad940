"""Broker topology (DESIGN §5): one direct exchange, one queue per message pattern, a DLX.

Queue names are part of the contract. Routing a task type to a queue is configuration
(``QW_TYPE_ROUTES``), so a deployment can give a type its own queue and its own workers;
a queue named there that is not one of the standard four is declared as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

TASKS_EXCHANGE = "tasks"
DEAD_LETTER_EXCHANGE = "tasks.dlx"
DEAD_LETTER_QUEUE = "tasks.dead_letter"
MAX_PRIORITY = 9

HTTP_QUEUE = "http.request"
DATA_QUEUE = "data.processing"
COMPENSATION_QUEUE = "compensation"
DEFAULT_QUEUE = "task.created"
STANDARD_QUEUES = (HTTP_QUEUE, DATA_QUEUE, COMPENSATION_QUEUE, DEFAULT_QUEUE)

DEFAULT_TYPE_ROUTES: dict[str, str] = {
    "HTTP_REQUEST": HTTP_QUEUE,
    "DATA_PROCESSING": DATA_QUEUE,
    "COMPENSATION": COMPENSATION_QUEUE,
}

tasks_exchange = Exchange(TASKS_EXCHANGE, type="direct", durable=True)
dead_letter_exchange = Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True)


def parse_type_routes(spec: Iterable[str]) -> dict[str, str]:
    """Parse ``TYPE=queue`` entries (from ``QW_TYPE_ROUTES``) over the default routes."""
    routes = dict(DEFAULT_TYPE_ROUTES)
    for entry in spec:
        task_type, sep, queue = entry.partition("=")
        if not sep or not task_type.strip() or not queue.strip():
            raise ImproperlyConfigured(
                f"QW_TYPE_ROUTES entries must look like TYPE=queue, got {entry!r}"
            )
        routes[task_type.strip()] = queue.strip()
    return routes


def work_queue(name: str) -> Queue:
    """A durable classic work queue with priorities that dead-letters into ``tasks.dlx``."""
    return Queue(
        name,
        exchange=tasks_exchange,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-max-priority": MAX_PRIORITY,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        },
    )


def work_queues(routes: Mapping[str, str]) -> tuple[Queue, ...]:
    names = list(STANDARD_QUEUES)
    names += sorted({q for q in routes.values() if q not in STANDARD_QUEUES})
    if DEAD_LETTER_QUEUE in names:
        raise ImproperlyConfigured(f"{DEAD_LETTER_QUEUE} cannot be used as a work queue")
    return tuple(work_queue(name) for name in names)


def dead_letter_queue() -> Queue:
    return Queue(
        DEAD_LETTER_QUEUE,
        exchange=dead_letter_exchange,
        routing_key="#",
        durable=True,
    )
