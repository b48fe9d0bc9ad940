"""The one decorator that declares every Celery task of the project.

Each task has an explicit ``name`` and ``queue`` (a test checks that the queue is declared;
``route_declared`` is the router that sends the task there),
late acknowledgement with rejection on a lost worker (at-least-once delivery; the state machine
makes a second delivery harmless), no stored result, and a log line when it ends badly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Task as CeleryTask

from queueworker.celery import app
from queueworker.messaging import TASKS_EXCHANGE

DECLARED: dict[str, str] = {}  # task name -> queue, for the configuration test


def instrumented_task(
    *, name: str, queue: str, **options: Any
) -> Callable[[Callable[..., Any]], CeleryTask]:
    def decorator(func: Callable[..., Any]) -> CeleryTask:
        DECLARED[name] = queue
        defaults: dict[str, Any] = {
            "name": name,
            "acks_late": True,
            "reject_on_worker_lost": True,
            "ignore_result": True,
            "typing": True,
        }
        defaults.update(options)
        task: CeleryTask = app.task(**defaults)(func)
        return task

    return decorator


def route_declared(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
) -> dict[str, str] | None:
    """Celery router: the queue a task was declared with (an explicit ``queue=`` still wins)."""
    queue = DECLARED.get(name)
    return {"queue": queue, "exchange": TASKS_EXCHANGE, "routing_key": queue} if queue else None
