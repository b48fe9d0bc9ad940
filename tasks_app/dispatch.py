"""Publishing wake-up messages: after commit, bounded in time, never the source of truth.

A message carries ``{taskType, taskId, delay, metadata}`` — ids, never payloads. If the
broker cannot take it, the task's ``dispatched_at`` is cleared and the dispatcher in beat
publishes it later; a short circuit breaker keeps every request from paying the connect
timeout while the broker is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from queueworker.celery import app
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


def wakeup_for(task: Task, countdown: float = 0.0) -> Wakeup:
    return Wakeup(str(task.id), task.type, task.queue, task.priority, task.timeout_s, countdown)


def message_kwargs(wakeup: Wakeup) -> dict[str, Any]:
    return {
        "taskType": wakeup.type,
        "taskId": wakeup.task_id,
        "delay": wakeup.countdown,
        "metadata": {"timeout_s": wakeup.timeout_s, "queue": wakeup.queue},
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
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for wakeup in wakeups:
                app.send_task(
                    EXECUTE_TASK,
                    kwargs=message_kwargs(wakeup),
                    task_id=wakeup.task_id,
                    queue=wakeup.queue,
                    routing_key=wakeup.queue,
                    priority=wakeup.priority,
                    countdown=wakeup.countdown or None,
                    soft_time_limit=wakeup.timeout_s,
                    time_limit=wakeup.timeout_s + HARD_LIMIT_GRACE_S,
                    producer=producer,
                )
                sent += 1
    except Exception:  # any broker failure has one remedy: the dispatcher publishes it later
        _trip_breaker()
        logger.warning(
            "broker unavailable: %d of %d wake-ups left to the dispatcher",
            len(wakeups) - sent,
            len(wakeups),
            exc_info=True,
        )
        _mark_undispatched(wakeups[sent:])
    return sent


def publish_on_commit(wakeups: Sequence[Wakeup]) -> None:
    """Publish once the surrounding transaction commits (at once outside one)."""
    if wakeups:
        transaction.on_commit(lambda: publish(wakeups), robust=True)


def _mark_undispatched(wakeups: Sequence[Wakeup]) -> None:
    Task.objects.filter(id__in=[w.task_id for w in wakeups], status__in=WAITING_STATUSES).update(
        dispatched_at=None
    )
