"""Worker process setup: database session settings, connection health, broker topology."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from django.conf import settings
from django.db.backends.signals import connection_created

from queueworker import messaging
from queueworker.logging import connect_celery

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
    if not settings.QW_WORKER_SYNC_COMMIT:
        connection_created.connect(_async_commit, weak=False, dispatch_uid="qw_async_commit")


@signals.worker_ready.connect
def _declare_dead_letter_queue(sender: Any = None, **kwargs: Any) -> None:
    from queueworker.celery import app

    try:
        with app.connection_for_write() as conn:
            messaging.dead_letter_queue()(conn.default_channel).declare()
    except Exception:  # the worker still runs; the queues' DLX argument holds until it exists
        logger.warning("could not declare %s", messaging.DEAD_LETTER_QUEUE, exc_info=True)
