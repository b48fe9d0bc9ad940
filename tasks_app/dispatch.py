"""Publishing wake-up messages: after commit, bounded in time, never the source of truth.

A message carries ``{taskType, taskId, delay, metadata}`` — ids, never payloads; ``metadata``
holds the time limit, the queue and, when the task was created or retried while handling a
request or a message that had one, its ``request_id`` (from ``queueworker.logcontext``). If the
broker cannot take it, the task's ``dispatched_at`` is cleared and the dispatcher (a leader
elected among every worker and beat, ``tasks_app.dispatcher``) publishes it later; a short
circuit breaker keeps every request from paying the connect timeout while the broker is down.

Wake-ups of the same type, queue, priority and delay share a message, up to
``QW_MESSAGE_MAX_TASKS`` ids: ``{taskType, taskId, taskIds, delay, metadata}`` where ``taskId``
is the first of ``taskIds``, ``metadata.timeout_s`` the largest time limit among them and
``metadata.request_id`` present only when every id shares it. One message per task cost the
worker a broker round trip and an ack per task; a group costs them once. The message's Celery
id is its first task's, and its ``shadow`` name is the task type, so Flower lists it under the
type. A message the broker refuses has the ``dispatched_at`` of each of its ids cleared.

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


def group(wakeups: Sequence[Wakeup], max_tasks: int) -> list[list[Wakeup]]:
    """Split ``wakeups`` into messages: same type, queue, priority and delay, at most
    ``max_tasks`` ids each, in the order the wake-ups came (1 gives a message per task)."""
    size = max(1, max_tasks)
    open_groups: dict[tuple[str, str, int, float], list[Wakeup]] = {}
    messages: list[list[Wakeup]] = []
    for wakeup in wakeups:
        key = (wakeup.type, wakeup.queue, wakeup.priority, wakeup.countdown)
        current = open_groups.get(key)
        if current is None or len(current) >= size:
            current = open_groups[key] = []
            messages.append(current)
        current.append(wakeup)
    return messages


def message_kwargs(wakeups: Wakeup | Sequence[Wakeup]) -> dict[str, Any]:
    """The message body of one wake-up, or of a group of them (see ``group``)."""
    members = [wakeups] if isinstance(wakeups, Wakeup) else list(wakeups)
    first = members[0]
    metadata: dict[str, Any] = {
        "timeout_s": max(w.timeout_s for w in members),
        "queue": first.queue,
    }
    request_ids = {w.request_id for w in members}
    if len(request_ids) == 1 and first.request_id is not None:
        metadata["request_id"] = first.request_id
    kwargs: dict[str, Any] = {"taskType": first.type, "taskId": first.task_id}
    if len(members) > 1:
        kwargs["taskIds"] = [w.task_id for w in members]
    kwargs["delay"] = first.countdown
    kwargs["metadata"] = metadata
    return kwargs


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


def publish(wakeups: Sequence[Wakeup], *, max_tasks: int | None = None) -> int:
    """Publish ``wakeups``, grouped into messages of up to ``max_tasks`` ids (default
    ``QW_MESSAGE_MAX_TASKS``); return how many the broker took. Never raises for broker errors.
    """
    if not wakeups:
        return 0
    if breaker_open():
        _mark_undispatched(wakeups)
        return 0
    size = settings.QW_MESSAGE_MAX_TASKS if max_tasks is None else max_tasks
    messages = group(wakeups, size)
    refused: list[Sequence[Wakeup]] = []
    try:
        if len(messages) > 1 and _confirms_batchable():
            refused = _publish_batch_confirmed(messages)
        else:
            with app.producer_or_acquire() as producer:
                for message in messages:
                    _send(message, producer)
    except Exception:  # any broker failure has one remedy: the dispatcher publishes it later
        _trip_breaker()
        logger.warning(
            "broker unavailable: %d wake-ups left to the dispatcher", len(wakeups), exc_info=True
        )
        # Some may have reached the broker; a second message for a task is harmless.
        _mark_undispatched(wakeups)
        return 0
    if refused:
        left = [w for message in refused for w in message]
        logger.warning(
            "the broker refused %d of %d messages: %d wake-ups left to the dispatcher",
            len(refused),
            len(messages),
            len(left),
        )
        _mark_undispatched(left)
        return len(wakeups) - len(left)
    return len(wakeups)


def _send(message: Sequence[Wakeup], producer: Any, **options: Any) -> None:
    first = message[0]
    timeout_s = max(w.timeout_s for w in message)
    # Celery's limits cover the whole message; a group's handlers each keep their own limit
    # in the worker, and the message's is their sum, the longest it may rightly run.
    limit = timeout_s if len(message) == 1 else sum(w.timeout_s for w in message)
    app.send_task(
        EXECUTE_TASK,
        kwargs=message_kwargs(message),
        task_id=first.task_id,
        # Flower and the worker's events name the message after its task type.
        shadow=first.type,
        # Named explicitly: without it Celery publishes a direct route on the default exchange.
        exchange=TASKS_EXCHANGE,
        queue=first.queue,
        routing_key=first.queue,
        priority=first.priority,
        countdown=first.countdown or None,
        soft_time_limit=limit,
        time_limit=limit + HARD_LIMIT_GRACE_S,
        producer=producer,
        **options,
    )


def _confirms_batchable() -> bool:
    options = app.conf.broker_transport_options or {}
    return bool(options.get("confirm_publish")) and app.conf.broker_url.startswith(
        ("amqp:", "amqps:", "pyamqp:")
    )


class PublishNotConfirmed(Exception):
    """The broker did not confirm the batch in time."""


def _publish_batch_confirmed(messages: Sequence[Sequence[Wakeup]]) -> list[Sequence[Wakeup]]:
    """Publish on a fresh confirm-mode channel; wait once for all the broker's confirms.

    Returns the messages the broker refused (nacked); raises if the confirms do not come.
    """
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
            unconfirmed = set(range(1, len(messages) + 1))
            nacked: set[int] = set()

            def on_ack(delivery_tag: int, multiple: bool) -> None:
                if multiple:
                    unconfirmed.difference_update(range(1, delivery_tag + 1))
                else:
                    unconfirmed.discard(delivery_tag)

            def on_nack(delivery_tag: int, multiple: bool) -> None:
                tags = range(1, delivery_tag + 1) if multiple else (delivery_tag,)
                nacked.update(tag for tag in tags if tag in unconfirmed)
                on_ack(delivery_tag, multiple)

            channel.events["basic_ack"].add(on_ack)
            channel.events["basic_nack"].add(on_nack)
            producer = app.amqp.Producer(channel)
            for message in messages:
                _send(message, producer, retry=False)
            deadline = time.monotonic() + settings.QW_PUBLISH_TIMEOUT_S + 0.01 * len(messages)
            while unconfirmed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishNotConfirmed(f"{len(unconfirmed)} messages not confirmed in time")
                conn.drain_events(timeout=left)
            return [messages[tag - 1] for tag in sorted(nacked)]
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
