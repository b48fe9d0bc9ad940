"""Worker process setup: database session settings, connection health, broker topology, and a
message strategy that refuses what it cannot read instead of stopping the worker.

The engine's part of a worker (each task process's heartbeat, the dispatcher candidate) is
``tasks_app.worker_signals``, connected by its app's ``ready()``: the project package names no
app module outside ``urls.py``. The handlers here reach the Celery app through their signal's
sender, not by importing ``queueworker.celery`` (which imports this module).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery import current_app, signals
from celery.exceptions import InvalidTaskError
from django.conf import settings
from django.db.backends.signals import connection_created
from kombu.exceptions import ContentDisallowed, DecodeError

from queueworker.logging import connect_celery
from queueworker.messaging import DEAD_LETTER_QUEUE, dead_letter_queue

logger = logging.getLogger(__name__)

# Worker and beat log through settings.LOGGING (LOG_FORMAT), not Celery's own handlers.
connect_celery()


def _async_commit(sender: Any, connection: Any, **kwargs: Any) -> None:
    """Worker transactions commit without waiting for the WAL flush.

    A commit lost in a PostgreSQL crash only means the task runs again (at-least-once after
    the API's 201, which itself stays a synchronous commit); the worker saves ~0.6 ms a commit.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO OFF")


@signals.worker_process_init.connect
def _init_worker_process(**kwargs: Any) -> None:
    _init_task_process()


def _init_task_process() -> None:
    if not settings.QW_WORKER_SYNC_COMMIT:
        connection_created.connect(_async_commit, weak=False, dispatch_uid="qw_async_commit")


def runs_tasks_in_worker_process(pool_cls: Any) -> bool:
    """Whether a pool runs its tasks in threads of the worker process without sending
    ``worker_process_init`` (threads, gevent, eventlet). Prefork sends it in each child and
    solo in the worker itself; the others never do."""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool
    from celery.concurrency.solo import TaskPool as SoloPool

    implementation = get_implementation(pool_cls)
    return isinstance(implementation, type) and not issubclass(
        implementation, PreforkPool | SoloPool
    )


@signals.worker_init.connect
def _init_threaded_worker(sender: Any = None, **kwargs: Any) -> None:
    """Under -P threads the worker process runs the tasks: its transactions commit as a task
    process's do."""
    if sender is not None and runs_tasks_in_worker_process(getattr(sender, "pool_cls", None)):
        _init_task_process()


def lower_priority(increment: int) -> int:
    """Lower this process's CPU priority by ``increment`` (``os.nice``); the new niceness.
    A process that may not (a restrictive sandbox) keeps its priority and says so."""
    try:
        return os.nice(increment)
    except OSError as exc:
        logger.warning("could not lower the worker's CPU priority by %d: %s", increment, exc)
        return os.nice(0)


@signals.worker_init.connect
def _lower_worker_priority(**kwargs: Any) -> None:
    """Before the pool starts (its processes inherit it): the API that creates the work keeps
    the CPU first when both share a host and the worker is saturated (``QW_WORKER_NICE``)."""
    if settings.QW_WORKER_NICE:
        niceness = lower_priority(settings.QW_WORKER_NICE)
        logger.info("worker CPU priority: niceness %d", niceness)


@signals.worker_ready.connect
def _declare_dead_letter_queue(sender: Any = None, **kwargs: Any) -> None:
    try:
        with _app_of(sender).connection_for_write() as conn:
            dead_letter_queue()(conn.default_channel).declare()
    except Exception:  # the worker still runs; the queues' DLX argument holds until it exists
        logger.warning("could not declare %s", DEAD_LETTER_QUEUE, exc_info=True)


def tolerant_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, except that a message it cannot read is refused, not fatal.

    Celery's consumer handles the errors it expects (disallowed content, an unknown task), but
    a message that names a known task without an ``id`` header, or whose body is not JSON or
    not ``[args, kwargs, embed]``, raises in the consumer itself: a body that does not decode is
    dropped, and a ``KeyError``/``ValueError`` is an "Unrecoverable error" that stops the worker
    (and, the message being unacknowledged, the next worker that takes it). Each of these
    becomes an ``InvalidTaskError``: logged, and rejected to ``tasks.dlx``, where the
    dead-letter consumer records it. Should the error come after the request was handed to the
    pool, a task whose message is refused is still in the database: the dispatcher sends it
    again.
    """
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **kwargs)

    def task_message_handler(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any
    ) -> Any:
        try:
            return handle(message, body, ack, reject, callbacks, **options)
        except (InvalidTaskError, ContentDisallowed):
            raise  # the consumer logs these and rejects the message itself
        except (DecodeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise InvalidTaskError(f"unreadable task message: {exc!r}") from exc

    return task_message_handler


@signals.worker_init.connect
def _tolerant_message_strategy(sender: Any = None, **kwargs: Any) -> None:
    """Every task of the app (ours and Celery's own) reads its messages tolerantly; the
    consumer builds its strategies after ``worker_init``."""
    _app_of(sender).Task.Strategy = f"{__name__}:tolerant_strategy"


def _app_of(sender: Any) -> Any:
    """The Celery app of a worker signal's sender (the worker, or its consumer)."""
    return getattr(sender, "app", None) or current_app
