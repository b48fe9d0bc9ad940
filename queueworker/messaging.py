"""Broker topology: one direct exchange, one queue per message pattern, a DLX; broker URLs.

Queue names are part of the contract. Routing a task type to a queue is configuration
(``QW_TYPE_ROUTES``), so a deployment can give a type its own queue and its own workers;
a queue named there that is not one of the standard four is declared as well.

Work queues are classic queues with priorities by default. ``QW_QUEUE_TYPE=quorum`` declares
them as quorum queues instead (replicated over a RabbitMQ cluster): RabbitMQ 3.x quorum queues
have no priorities, so ``x-max-priority`` is left out, and ``x-delivery-limit`` dead-letters a
message redelivered that many times (a message that kills every worker it reaches). A queue's
type cannot change in place: RabbitMQ refuses the declaration (PRECONDITION_FAILED) while a
queue of the other type exists under that name.

``CELERY_BROKER_URL`` may list several URLs separated by ``;`` (kombu's failover form, one per
cluster node): the helpers here read such a list; kombu connects to the first that answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue
from kombu.utils.url import parse_url

TASKS_EXCHANGE = "tasks"
DEAD_LETTER_EXCHANGE = "tasks.dlx"
DEAD_LETTER_QUEUE = "tasks.dead_letter"
MAX_PRIORITY = 9
CLASSIC = "classic"
QUORUM = "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM)
DEFAULT_DELIVERY_LIMIT = 20

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


def work_queue(
    name: str, queue_type: str = CLASSIC, delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> Queue:
    """A durable work queue that dead-letters into ``tasks.dlx``: classic with priorities, or
    quorum with a delivery limit (quorum queues of RabbitMQ 3.x have no priorities)."""
    arguments: dict[str, object] = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    if queue_type == QUORUM:
        arguments |= {"x-queue-type": QUORUM, "x-delivery-limit": delivery_limit}
    elif queue_type == CLASSIC:
        arguments["x-max-priority"] = MAX_PRIORITY
    else:
        raise ImproperlyConfigured(
            f"QW_QUEUE_TYPE must be one of {', '.join(QUEUE_TYPES)}, got {queue_type!r}"
        )
    return Queue(
        name,
        exchange=tasks_exchange,
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )


def work_queues(
    routes: Mapping[str, str],
    queue_type: str = CLASSIC,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> tuple[Queue, ...]:
    names = list(STANDARD_QUEUES)
    names += sorted({q for q in routes.values() if q not in STANDARD_QUEUES})
    if DEAD_LETTER_QUEUE in names:
        raise ImproperlyConfigured(f"{DEAD_LETTER_QUEUE} cannot be used as a work queue")
    return tuple(work_queue(name, queue_type, delivery_limit) for name in names)


def dead_letter_queue() -> Queue:
    return Queue(
        DEAD_LETTER_QUEUE,
        exchange=dead_letter_exchange,
        routing_key="#",
        durable=True,
    )


def broker_urls(url: str) -> list[str]:
    """The URLs of a ``;``-separated failover list (one URL gives a list of one), stripped."""
    return [part.strip() for part in url.split(";") if part.strip()]


def broker_vhost(url: str) -> str:
    """The virtual host of a broker URL or failover list (the first URL's: a cluster's nodes
    share their vhosts). ``amqp://host//`` and ``amqp://host`` are the default vhost ``/``."""
    urls = broker_urls(url)
    return (parse_url(urls[0])["virtual_host"] if urls else None) or "/"


def with_vhost(url: str, vhost: str) -> str:
    """The same URL or failover list with every URL pointing at ``vhost``."""
    return ";".join(
        urlunsplit(urlsplit(part)._replace(path=f"/{quote(vhost, safe='')}"))
        for part in broker_urls(url)
    )
