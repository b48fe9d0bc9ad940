"""The dispatcher loop: one process at a time publishes due work and runs the recovery sweep.

Every worker (a thread of its main process, from ``worker_ready`` to shutdown) and every beat
(whatever its scheduler class) runs this loop, so that the service dispatches and recovers
wherever it runs and no single process is needed. Each pass, every ``QW_DISPATCH_INTERVAL_S``:

1. Elect: take or renew the lease row (``DispatcherLease``) with one guarded UPDATE,
   ``… WHERE holder = me OR expires_at < now``, on the database's clock. A leader that dies
   stops renewing; another candidate takes over within ``lease_ttl_s()`` plus one interval.
2. The leader runs ``recovery.dispatch_due`` each pass and the sweep each
   ``QW_SWEEP_INTERVAL_S`` (lost tasks, workflow runs, expired artifacts, old heartbeats), then
   records ``last_run_at``, whose age ``/api/health/`` reports.

Why a lease row rather than a session advisory lock: an advisory lock lives in one database
session, so each candidate would hold a dedicated connection, and behind a transaction-pooling
proxy (PgBouncer's transaction mode) the lock would stay with whichever client's transaction
happened to take it. A row needs no session, works through any pooler and on the embedded
SQLite, and records when the leader last ran. Two leaders for a moment (a paused leader whose
lease was taken) do no harm: dispatch takes its rows ``FOR UPDATE SKIP LOCKED`` and the
sweep's transitions are guarded.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections
from django.db.models import Q
from django.db.models.functions import Now

from tasks_app import liveness
from tasks_app.models import DispatcherLease

logger = logging.getLogger(__name__)

LEASE_NAME = "dispatcher"
# While a pass keeps failing (a database outage), one log line this often.
FAILURE_REPORT_S = 30.0


def lease_ttl_s() -> float:
    """How long a leader's lease lasts without renewal: three passes, at least 2 s."""
    return max(3 * settings.QW_DISPATCH_INTERVAL_S, 2.0)


def stale_after_s() -> float:
    """Health fails when the dispatcher has not run for this long (a few missed sweeps)."""
    return 3 * max(settings.QW_SWEEP_INTERVAL_S, lease_ttl_s())


def elect(identity: str, now: datetime) -> bool:
    """Take the lease if it is free or expired, or renew it if ours; True if we lead."""
    until = now + timedelta(seconds=lease_ttl_s())
    free = Q(holder=identity) | Q(expires_at__isnull=True) | Q(expires_at__lt=now)
    leases = DispatcherLease.objects.filter(name=LEASE_NAME)
    if leases.filter(holder=identity).update(expires_at=until):
        return True
    if leases.filter(free).update(holder=identity, expires_at=until, acquired_at=now):
        return True
    if not leases.exists():  # a new database: make the row, then try once more
        DispatcherLease.objects.bulk_create(
            [DispatcherLease(name=LEASE_NAME)], ignore_conflicts=True
        )
        return bool(leases.filter(free).update(holder=identity, expires_at=until, acquired_at=now))
    return False


def record_run(identity: str) -> None:
    DispatcherLease.objects.filter(name=LEASE_NAME, holder=identity).update(last_run_at=Now())


def resign(identity: str) -> None:
    """Give the lease up at once (a clean shutdown): the next candidate need not wait."""
    DispatcherLease.objects.filter(name=LEASE_NAME, holder=identity).update(expires_at=None)


class DispatcherNotRunning(Exception):
    """No process has run the dispatcher recently."""


def status() -> str:
    """``last ran 2 s ago on <process>``; raises ``DispatcherNotRunning`` when it is stale."""
    lease = DispatcherLease.objects.filter(name=LEASE_NAME).first()
    if lease is None or lease.last_run_at is None:
        raise DispatcherNotRunning(
            "has never run: start a worker (celery -A queueworker worker) or beat"
        )
    age = max(0.0, (liveness.db_now() - lease.last_run_at).total_seconds())
    if age > stale_after_s():
        raise DispatcherNotRunning(
            f"last ran {age:.0f} s ago on {lease.holder} (limit {stale_after_s():.0f} s): "
            "no worker or beat is running it"
        )
    return f"last ran {age:.0f} s ago on {lease.holder}"


def health_check() -> str:
    """The ``dispatcher`` check of the health endpoints (``TasksAppConfig.ready()`` registers
    it with ``queueworker.health``): ``status()`` in a check's own thread."""
    try:
        return status()  # "last ran 2 s ago on …", or raises naming what is wrong
    finally:
        connections.close_all()  # a thread's own connection; do not leave it open


class Dispatcher:
    """One process's candidate: ``run_once`` is a pass; ``start`` runs passes in a thread."""

    def __init__(self, role: str) -> None:
        self.identity = f"{role} on {socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:6]}"
        self.leader = False
        self.dispatch_interval = settings.QW_DISPATCH_INTERVAL_S
        self.sweep_interval = settings.QW_SWEEP_INTERVAL_S
        self._next_dispatch = 0.0
        self._next_sweep = 0.0
        self._healthy_since: datetime | None = None  # database clock
        self._failing_since: float | None = None
        self._last_failure_report = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        """One pass; a failure (a database outage) is logged sparingly and the next pass retries."""
        now = time.monotonic()
        try:
            self._pass(now)
        except Exception as exc:  # the loop must outlive any outage
            close_old_connections()
            if isinstance(exc, DatabaseError):
                self._healthy_since = None
            self._failed(exc, now)
            return
        if self._failing_since is not None:
            logger.warning("dispatcher works again after %.0f s", now - self._failing_since)
            self._failing_since = None

    def _pass(self, now: float) -> None:
        from tasks_app import artifacts, hooks, recovery

        db_time = liveness.db_now()
        if self._healthy_since is None:
            self._healthy_since = db_time
        was_leader, self.leader = self.leader, elect(self.identity, db_time)
        if not self.leader:
            if was_leader:
                logger.warning("%s no longer leads the dispatcher", self.identity)
            return
        if not was_leader:
            logger.info("%s leads the dispatcher", self.identity)
            self._next_dispatch = self._next_sweep = 0.0
        if now >= self._next_dispatch:
            self._next_dispatch = now + self.dispatch_interval
            recovery.dispatch_due()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            recovery.expire_leases(healthy_since=self._healthy_since)
            hooks.reconcile()  # the apps' own repairs (runs left undecided)
            artifacts.expire()
            recovery.forget_heartbeats()
        record_run(self.identity)

    def _failed(self, exc: Exception, now: float) -> None:
        """The first failure with its traceback; while it lasts, one line every
        ``FAILURE_REPORT_S`` instead of one per pass (a database outage is many passes)."""
        if self._failing_since is None:
            self._failing_since = self._last_failure_report = now
            logger.exception("dispatcher pass failed")
        elif now - self._last_failure_report >= FAILURE_REPORT_S:
            self._last_failure_report = now
            logger.error(
                "dispatcher still failing after %.0f s: %s", now - self._failing_since, exc
            )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qw-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.dispatch_interval)
        try:
            if self.leader:
                resign(self.identity)
        except DatabaseError:
            pass  # the lease runs out by itself
        connections.close_all()


_running: Dispatcher | None = None
_lock = threading.Lock()


def start(role: str) -> Dispatcher:
    """Run this process's candidate in a thread (once per process)."""
    global _running
    with _lock:
        if _running is None:
            _running = Dispatcher(role)
            _running.start()
            logger.info("dispatcher candidate started: %s", _running.identity)
        return _running


def stop() -> None:
    global _running
    with _lock:
        if _running is not None:
            _running.stop()
            _running = None
