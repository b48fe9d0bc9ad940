"""Publishing wake-up messages: after commit, bounded in time, never the source of truth.

A message carries ``{taskType, taskId, delay, metadata}`` — ids, never payloads; ``metadata``
holds the time limit, the queue and, when the task was created or retried while handling a
request or a message that had one, its ``request_id`` (from ``queueworker.logcontext``). If the
broker cannot take it, the task's ``dispatched_at`` is cleared and the dispatcher (a leader
elected among every worker and beat, ``tasks_app.dispatcher``) publishes it later; a short
circuit breaker keeps every request from paying the connect timeout while the broker is down.

Publisher confirms are kept, but a batch waits for them together: a one-at-a-time confirm
costs a broker round trip per message (~1 ms here), which capped bulk creation near 500
messages a second. ``publish`` sends a batch on a channel in confirm mode and then drains the
broker's acks (which RabbitMQ coalesces with ``multiple``) until every message is confirmed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction

from queueworker import logcontext
from queueworker.celery import app
from queueworker.messaging import TASKS_EXCHANGE
from tasks_app.models import WAITING_STATUSES, Task

logger = logging.getLogger(__name__)

EXECUTE_TASK = "queueworker.execute"
HARD_LIMIT_GRACE_S = 10
BREAKER_OPEN_S = 5.0

_breaker_lock = threading.Lock()
_broker_down_until = 0.0


@dataclass(frozen=True)
class Wakeup:
    task_id: str
    type: str
    queue: str
    priority: int
    timeout_s: int
    countdown: float = 0.0
    request_id: str | None = None


def wakeup_for(task: Task, countdown: float = 0.0) -> Wakeup:
    return Wakeup(
        str(task.id),
        task.type,
        task.queue,
        task.priority,
        task.timeout_s,
        countdown,
        logcontext.request_id(),
    )


def message_kwargs(wakeup: Wakeup) -> dict[str, Any]:
    metadata: dict[str, Any] = {"timeout_s": wakeup.timeout_s, "queue": wakeup.queue}
    if wakeup.request_id is not None:
        metadata["request_id"] = wakeup.request_id
    return {
        "taskType": wakeup.type,
        "taskId": wakeup.task_id,
        "delay": wakeup.countdown,
        "metadata": metadata,
    }


def breaker_open() -> bool:
    return time.monotonic() < _broker_down_until


def _trip_breaker() -> None:
    global _broker_down_until
    with _breaker_lock:
        _broker_down_until = time.monotonic() + BREAKER_OPEN_S


def reset_breaker() -> None:
    global _broker_down_until
    with _breaker_lock:
        _broker_down_until = 0.0


def publish(wakeups: Sequence[Wakeup]) -> int:
    """Publish ``wakeups``; return how many the broker took. Never raises for broker errors."""
    if not wakeups:
        return 0
    if breaker_open():
        _mark_undispatched(wakeups)
        return 0
    try:
        if len(wakeups) > 1 and _confirms_batchable():
            _publish_batch_confirmed(wakeups)
        else:
            with app.producer_or_acquire() as producer:
                for wakeup in wakeups:
                    _send(wakeup, producer)
    except Exception:  # any broker failure has one remedy: the dispatcher publishes it later
        _trip_breaker()
        logger.warning(
            "broker unavailable: %d wake-ups left to the dispatcher", len(wakeups), exc_info=True
        )
        # Some may have reached the broker; a second message for a task is harmless.
        _mark_undispatched(wakeups)
        return 0
    return len(wakeups)


def _send(wakeup: Wakeup, producer: Any, **options: Any) -> None:
    app.send_task(
        EXECUTE_TASK,
        kwargs=message_kwargs(wakeup),
        task_id=wakeup.task_id,
        # Named explicitly: without it Celery publishes a direct route on the default exchange.
        exchange=TASKS_EXCHANGE,
        queue=wakeup.queue,
        routing_key=wakeup.queue,
        priority=wakeup.priority,
        countdown=wakeup.countdown or None,
        soft_time_limit=wakeup.timeout_s,
        time_limit=wakeup.timeout_s + HARD_LIMIT_GRACE_S,
        producer=producer,
        **options,
    )


def _confirms_batchable() -> bool:
    options = app.conf.broker_transport_options or {}
    return bool(options.get("confirm_publish")) and app.conf.broker_url.startswith(
        ("amqp:", "amqps:", "pyamqp:")
    )


class PublishNotConfirmed(Exception):
    """The broker nacked a message of the batch, or did not confirm it in time."""


def _publish_batch_confirmed(wakeups: Sequence[Wakeup]) -> None:
    """Publish on a fresh confirm-mode channel; wait once for all the broker's confirms."""
    pool: Any = app.pool  # kombu's connection pool (the stubs type it as a producer pool)
    with pool.acquire(block=True) as conn:
        try:
            # A pooled connection may be left broken by an outage: reconnect it, bounded.
            conn.ensure_connection(
                max_retries=1, interval_start=0, timeout=settings.QW_PUBLISH_TIMEOUT_S
            )
            channel = conn.channel()
        except Exception:
            conn.collect()  # drop the broken transport so the next use starts afresh
            raise
        try:
            channel.confirm_select()
            channel._confirm_selected = True
            # The channel's basic_publish waits for each confirm; publish without waiting and
            # collect the confirms below (delivery tags count from 1 on a new channel).
            channel.basic_publish = channel._basic_publish
            unconfirmed = set(range(1, len(wakeups) + 1))
            nacked: list[int] = []

            def on_ack(delivery_tag: int, multiple: bool) -> None:
                if multiple:
                    unconfirmed.difference_update(range(1, delivery_tag + 1))
                else:
                    unconfirmed.discard(delivery_tag)

            def on_nack(delivery_tag: int, multiple: bool) -> None:
                nacked.append(delivery_tag)
                on_ack(delivery_tag, multiple)

            channel.events["basic_ack"].add(on_ack)
            channel.events["basic_nack"].add(on_nack)
            producer = app.amqp.Producer(channel)
            for wakeup in wakeups:
                _send(wakeup, producer, retry=False)
            deadline = time.monotonic() + settings.QW_PUBLISH_TIMEOUT_S + 0.01 * len(wakeups)
            while unconfirmed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishNotConfirmed(f"{len(unconfirmed)} messages not confirmed in time")
                conn.drain_events(timeout=left)
            if nacked:
                raise PublishNotConfirmed(f"the broker refused {len(nacked)} messages")
        except Exception:
            conn.collect()
            raise
        finally:
            with suppress(Exception):  # the channel may already be gone with the connection
                channel.close()


def publish_on_commit(wakeups: Sequence[Wakeup]) -> None:
    """Publish once the surrounding transaction commits (at once outside one)."""
    if wakeups:
        transaction.on_commit(lambda: publish(wakeups), robust=True)


def _mark_undispatched(wakeups: Sequence[Wakeup]) -> None:
    Task.objects.filter(id__in=[w.task_id for w in wakeups], status__in=WAITING_STATUSES).update(
        dispatched_at=None
    )
