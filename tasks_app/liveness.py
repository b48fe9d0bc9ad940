"""Worker liveness: each process that runs tasks says it is alive; the sweep believes it.

A task's attempt records its ``holder``, the process that claimed it. That process writes its
``WorkerHeartbeat`` row every ``interval()`` seconds from a background thread: one UPDATE per
process per interval, whatever it runs, so the task path gains no statement. Times are the
database's (``now()``), so no worker's clock matters. A PROCESSING task whose holder has not
written for ``QW_LEASE_SECONDS`` lost its worker (``tasks_app.recovery``), however long its
time limit; a live holder keeps its task however long it runs.

Under prefork the holder is the pool child: a SIGKILLed child stops beating while its parent
lives on. A child whose parent died stops beating too: its result can no longer be
acknowledged, and the task is run again elsewhere (a late completion is fenced out). Under
``-P solo`` and ``-P threads`` the worker process itself is the holder of every task it runs,
whichever thread claimed it (``tasks_app.worker_signals`` starts its heartbeat): a SIGKILL
stops the beat and all of its tasks are recovered after one lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError, connection, connections
from django.db.models.functions import Now
from django.utils import timezone

from tasks_app.models import WorkerHeartbeat

logger = logging.getLogger(__name__)

# A failed write is tried again this soon (a terminated connection reconnects at once).
RETRY_S = 0.5
FIRST_BEAT_WAIT_S = 2.0


def db_now() -> datetime:
    """The database's clock (PostgreSQL's ``statement_timestamp()``); SQLite shares ours."""
    if connection.vendor != "postgresql":
        return timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        value: datetime = cursor.fetchone()[0]
    return value


def interval() -> float:
    """Seconds between heartbeats: a sixth of the lease, at most one a second, and at least
    three per lease whatever its length."""
    lease = float(settings.QW_LEASE_SECONDS)
    return min(max(lease / 6, 1.0), lease / 3)


class Heartbeat:
    """This process's heartbeat row and the thread that keeps it fresh."""

    def __init__(self, *, parent_pid: int | None = None) -> None:
        self.id = uuid.uuid4()
        self.parent_pid = parent_pid
        self.registered = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._first = threading.Event()

    def start(self) -> None:
        """Start the thread; wait briefly for the first row, so that the first claim names it."""
        self._thread = threading.Thread(target=self._run, name="qw-heartbeat", daemon=True)
        self._thread.start()
        self._first.wait(timeout=FIRST_BEAT_WAIT_S)

    def stop(self) -> None:
        """Stop beating and remove the row: a process that exits holds nothing."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def beat(self) -> bool:
        """Write ``beat_at = now()``; the row is made on the first beat (or if it was removed)."""
        try:
            if not WorkerHeartbeat.objects.filter(pk=self.id).update(beat_at=Now()):
                WorkerHeartbeat.objects.create(
                    id=self.id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=Now(),
                    beat_at=Now(),
                )
        except DatabaseError as exc:
            connection.close()  # this thread's connection; the next beat reconnects
            if not self._failing:
                logger.warning("heartbeat failed: %s", exc)
            self._failing = True
            return False
        if self._failing:
            logger.info("heartbeat written again")
        self._failing = False
        self.registered = True
        return True

    def _orphaned(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _run(self) -> None:
        """The thread: its own connection, one UPDATE per interval (sooner after a failure)."""
        wait = interval() if self.beat() else RETRY_S
        self._first.set()
        while not self._stop.wait(wait):
            if self._orphaned():
                logger.warning("the worker that started this pool process is gone: no heartbeat")
                break
            wait = interval() if self.beat() else RETRY_S
        if self._stop.is_set():
            try:
                WorkerHeartbeat.objects.filter(pk=self.id).delete()
            except DatabaseError:
                pass  # the row goes stale, which says the same
        connections.close_all()


_current: Heartbeat | None = None
_lock = threading.Lock()


def start(*, pool_child: bool) -> Heartbeat:
    """Start this process's heartbeat (once); ``pool_child``: stop it if the parent dies."""
    global _current
    with _lock:
        if _current is None:
            _current = Heartbeat(parent_pid=os.getppid() if pool_child else None)
            _current.start()
        return _current


def stop() -> None:
    global _current
    with _lock:
        if _current is not None:
            _current.stop()
            _current = None


def holder() -> uuid.UUID | None:
    """The id a claim records: this process's heartbeat, once its row exists. Without one
    (a process that runs tasks without a heartbeat) only the backstop lease bounds the task."""
    current = _current
    return current.id if current is not None and current.registered else None
