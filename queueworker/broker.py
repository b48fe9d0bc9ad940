"""What the broker says about the queues: depth, unacked messages, consumers.

From RabbitMQ's management API when ``QW_RABBITMQ_MANAGEMENT_URL`` is set (it alone knows the
unacknowledged count), else from a passive ``queue_declare`` on a short-lived connection
(ready messages and consumers; ``messages_unacked`` is then null). Every call is bounded in
time: an unreachable broker answers with an error, never a hang.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from django.conf import settings

from queueworker import messaging
from queueworker.celery import app

TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 1  # kombu's ensure_connection takes whole seconds (purge)
CACHE_S = 5.0


@dataclass(frozen=True)
class QueueStats:
    name: str
    messages: int | None
    messages_unacked: int | None
    consumers: int | None
    error: str = ""

    @property
    def overloaded(self) -> bool:
        return self.messages is not None and self.messages > settings.QW_QUEUE_OVERLOAD_THRESHOLD


def declared_queue_names() -> list[str]:
    """The work queues and the dead-letter queue, in the configuration's order."""
    return [q.name for q in settings.CELERY_TASK_QUEUES] + [messaging.DEAD_LETTER_QUEUE]


def queue_stats(names: list[str] | None = None) -> list[QueueStats]:
    names = names or declared_queue_names()
    if settings.QW_RABBITMQ_MANAGEMENT_URL:
        return [_from_management(name) for name in names]
    return _from_declare(names)


def _vhost() -> str:
    return messaging.broker_vhost(app.conf.broker_url or "")


def _retries_to_try_each_url(conn: Any) -> int:
    """``max_retries`` that gives each URL of a failover list one connect attempt: kombu moves
    to the next URL after each failure, so 0 would never try past the first."""
    return max(len(conn.alt), 1) - 1


def _from_management(name: str) -> QueueStats:
    base = urlsplit(settings.QW_RABBITMQ_MANAGEMENT_URL)
    auth = (base.username or "guest", base.password or "guest")
    netloc = base.hostname or "localhost"
    if base.port:
        netloc += f":{base.port}"
    url = urlunsplit(
        base._replace(
            netloc=netloc,
            path=f"{base.path.rstrip('/')}/api/queues/{quote(_vhost(), safe='')}/{quote(name)}",
        )
    )
    try:
        response = requests.get(url, auth=auth, timeout=TIMEOUT_S)
        if response.status_code == 404:
            return QueueStats(name, 0, 0, 0, "not declared yet")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
    except (requests.RequestException, ValueError) as exc:
        return QueueStats(name, None, None, None, f"management API: {type(exc).__name__}")
    return QueueStats(
        name,
        body.get("messages_ready"),
        body.get("messages_unacknowledged"),
        body.get("consumers"),
    )


def _from_declare(names: list[str]) -> list[QueueStats]:
    """A passive ``queue_declare`` per queue on a fresh connection, one connect attempt, with
    socket timeouts: a broker that accepts but never answers cannot hang the caller."""
    options: dict[str, Any] = {}
    if not settings.IS_EMBEDDED_BROKER:
        options = {"read_timeout": TIMEOUT_S, "write_timeout": TIMEOUT_S}
    stats: list[QueueStats] = []
    try:
        with app.connection_for_read(
            connect_timeout=TIMEOUT_S, heartbeat=0, transport_options=options
        ) as conn:
            # One attempt per URL, each bounded by connect_timeout, no sleep between them.
            conn.ensure_connection(max_retries=_retries_to_try_each_url(conn))
            for name in names:
                channel: Any = conn.channel()
                try:
                    _, messages, consumers = channel.queue_declare(queue=name, passive=True)
                    if settings.IS_EMBEDDED_BROKER:
                        consumers = None  # a file-based transport does not know its consumers
                    stats.append(QueueStats(name, messages, None, consumers))
                except conn.channel_errors as exc:  # a queue nobody declared yet: a 404
                    stats.append(QueueStats(name, 0, None, 0, f"not declared yet ({exc})"))
                finally:
                    with suppress(Exception):  # already closed by the broker after a 404
                        channel.close()
    except Exception as exc:  # unreachable, refused, timed out: every figure unknown
        detail = f"broker unreachable: {type(exc).__name__}: {exc}"
        return [QueueStats(name, None, None, None, detail) for name in names]
    return stats


def reachable(stats: list[QueueStats]) -> bool:
    return any(s.messages is not None for s in stats)


_cache: dict[str, tuple[float, QueueStats]] = {}
_cache_lock = threading.Lock()


def cached_consumers(name: str) -> int | None:
    """Consumers of one queue, cached for a few seconds per process (for ``wait_reason``)."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(name)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1].consumers
    (stats,) = queue_stats([name])
    with _cache_lock:
        _cache[name] = (now, stats)
    return stats.consumers


def purge(name: str) -> int:
    with app.connection_for_write() as conn:
        conn.ensure_connection(
            max_retries=max(1, _retries_to_try_each_url(conn)),
            interval_start=0,
            timeout=CONNECT_TIMEOUT_S,
        )
        channel: Any = conn.channel()
        try:
            return int(channel.queue_purge(name) or 0)
        finally:
            channel.close()
