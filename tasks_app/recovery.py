"""The dispatcher of due work and the recovery sweep (run by the elected leader, see
``tasks_app.dispatcher``).

- ``dispatch_due`` publishes waiting tasks that are due and have no message in flight: delayed
  and scheduled tasks, long backoffs, tasks whose publish failed (``dispatched_at`` null), and
  tasks whose message was lost: published more than ``QW_LOST_MESSAGE_GRACE_S`` ago into a
  queue the broker says is empty, or more than ``QW_REDISPATCH_SECONDS`` ago whatever the
  queue holds (``_empty_queues`` says why). A duplicate message is harmless: the claim admits
  one. Rows are taken with ``FOR UPDATE SKIP LOCKED``, so two dispatchers at once never publish
  the same task.
- ``expire_leases`` turns PROCESSING tasks whose worker is gone into a failed attempt of class
  ``worker_lost``: RETRYING while retries remain, else FAILED. Gone means that the holder's
  heartbeat is older than ``QW_LEASE_SECONDS`` (``tasks_app.liveness``), or that the backstop
  lease ran out (a holder alive but never finishing, or a data task's batches stalled, not
  merely queued behind a backlog: ``_not_queued``). A task that kills its worker every time
  therefore ends FAILED after ``max_retries``.

All times are the database's. After an outage, every heartbeat is old, the live workers' as
well: the sweep judges nothing until it has itself reached the database for a whole
``QW_LEASE_SECONDS`` (``healthy_since``), time in which every live worker writes again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q

from queueworker import broker
from tasks_app import dispatch, hooks, liveness, state
from tasks_app.models import (
    WAITING_STATUSES,
    DataJob,
    LogLevel,
    Task,
    TaskLog,
    TaskStatus,
    WorkerHeartbeat,
)
from tasks_app.worker import retry_delay

logger = logging.getLogger(__name__)

BATCH = 1000
MAX_BATCHES = 20
HEARTBEAT_KEEP_S = 3600


def dispatch_due(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Publish due waiting tasks that have no live message; return how many were published."""
    empty = _empty_queues(now or liveness.db_now())
    total = 0
    for _ in range(MAX_BATCHES):
        published = _dispatch_batch(now or liveness.db_now(), batch, empty)
        total += published
        if published < batch:
            break
    return total


@dataclass(frozen=True)
class EmptyQueues:
    """Work queues that held no ready message when the broker was asked, after ``before``."""

    names: frozenset[str]
    before: datetime


def _empty_queues(now: datetime) -> EmptyQueues:
    """Which work queues are empty, asked only when a waiting task may have lost its message.

    A task published (``dispatched_at``) more than ``QW_LOST_MESSAGE_GRACE_S`` ago and still
    waiting either has its message behind a backlog, or has none: its creator died between
    commit and publish, or the broker dropped it. The database cannot tell the two apart, so
    the ``QW_REDISPATCH_SECONDS`` rule waits minutes for both. The broker can: a queue with no
    ready message hides no message behind anything. Its count is taken after ``before``, so a
    message published before it would have been counted, unless a worker had already taken it
    (its claim follows at once; an ETA message's ``dispatched_at`` is its due time, so the
    grace runs from when it fires) or holds it in its prefetch, where a second message is a
    harmless duplicate. A queue with a backlog keeps the slow rule, so sustained overload is
    not doubled by re-publishing; an empty queue gains at most one message per waiting task
    per grace. Without an answer (broker unreachable, its circuit breaker open, a management
    API without figures yet) every queue keeps the slow rule.

    Why ask about every work queue rather than the queues of the waiting tasks: one ``EXISTS``
    stops at the first suspect, while the distinct queues of a backlog need a scan of all of
    it each pass; the broker answers a handful of passive declares on one connection in
    milliseconds. With ``QW_RABBITMQ_MANAGEMENT_URL`` the figures are the management API's,
    refreshed every 5 s by default: the grace must stay above that interval.
    """
    before = now - timedelta(seconds=settings.QW_LOST_MESSAGE_GRACE_S)
    nothing = EmptyQueues(frozenset(), before)
    lost_before = now - timedelta(seconds=settings.QW_REDISPATCH_SECONDS)
    if before <= lost_before or dispatch.breaker_open():
        return nothing
    names = [queue.name for queue in settings.CELERY_TASK_QUEUES]
    suspects = Task.objects.filter(
        status__in=WAITING_STATUSES,
        next_attempt_at__lte=now,
        queue__in=names,
        dispatched_at__lt=before,
        dispatched_at__gte=lost_before,
    )
    if not suspects.exists():
        return nothing
    stats = broker.queue_stats(names)
    if not broker.reachable(stats):
        logger.debug(
            "queue depths unknown (%s): lost messages wait for QW_REDISPATCH_SECONDS",
            stats[0].error if stats else "no queues",
        )
    return EmptyQueues(frozenset(s.name for s in stats if s.messages == 0), before)


def _dispatch_batch(now: datetime, batch: int, empty: EmptyQueues) -> int:
    lost = Q(dispatched_at__lt=now - timedelta(seconds=settings.QW_REDISPATCH_SECONDS))
    if empty.names:
        lost |= Q(queue__in=empty.names, dispatched_at__lt=empty.before)
    with transaction.atomic():
        due = list(
            Task.objects.select_for_update(skip_locked=True)
            .filter(status__in=WAITING_STATUSES, next_attempt_at__lte=now)
            .filter(Q(dispatched_at__isnull=True) | lost)
            .order_by("next_attempt_at")
            .only("id", "type", "queue", "priority", "timeout_s", "dispatched_at")[:batch]
        )
        if not due:
            return 0
        Task.objects.filter(id__in=[t.id for t in due]).update(dispatched_at=now)
        redispatched = [t for t in due if t.dispatched_at is not None]
        if redispatched:
            TaskLog.objects.bulk_create(
                TaskLog(
                    task=t,
                    level=LogLevel.WARNING,
                    event="redispatched",
                    message="no worker took its message in time: published again",
                )
                for t in redispatched
            )
            logger.warning("redispatching %d tasks whose message was lost", len(redispatched))
        dispatch.publish_on_commit([dispatch.wakeup_for(t) for t in due])
    return len(due)


def expire_leases(
    *,
    now: datetime | None = None,
    healthy_since: datetime | None = None,
    batch: int = BATCH,
) -> int:
    """Recover PROCESSING tasks whose worker is gone; return how many.

    ``healthy_since``: since when the caller has reached the database without a failure
    (None: the caller vouches for it). Until that is ``QW_LEASE_SECONDS`` ago, nothing is
    judged: a heartbeat missed during an outage is no sign of death.
    """
    now = now or liveness.db_now()
    stale_before = now - timedelta(seconds=settings.QW_LEASE_SECONDS)
    if healthy_since is not None and healthy_since > stale_before:
        return 0
    alive = WorkerHeartbeat.objects.filter(pk=OuterRef("holder"), beat_at__gte=stale_before)
    candidates: list[Task] = list(
        Task.objects.filter(status=TaskStatus.PROCESSING)
        .alias(alive=Exists(alive))
        .filter(Q(lease_expires_at__lt=now) | Q(holder__isnull=False, alive=False))
        .annotate(waits_for_batches=Exists(DataJob.objects.filter(task=OuterRef("pk"))))
        .order_by("lease_expires_at")
        .only(
            "id",
            "workflow_run_id",
            "attempt",
            "retries",
            "max_retries",
            "retry_backoff_s",
            "retry_backoff_max_s",
            "retry_jitter",
            "lease_expires_at",
            "holder",
            "queue",
            "timeout_s",
        )[:batch]
    )
    lost = _not_queued(candidates, now)
    count = 0
    for task in lost:
        retry = task.retries < task.max_retries
        delay = retry_delay(task) if retry else 0.0
        with transaction.atomic():
            # A retry is no terminal transition: only a final expiry concerns the observers,
            # whose locks come first, then the task's row.
            terminal = None if retry else hooks.Terminal(task)
            expired_task = state.expire_lease(
                task, retry=retry, delay_s=delay, now=now, stale_before=stale_before
            )
            if expired_task is not None:
                count += 1
                if terminal is not None:
                    terminal.finished(expired_task)
    if count:
        logger.warning("%d tasks lost their worker", count)
    return count


def _not_queued(tasks: list[Task], now: datetime) -> list[Task]:
    """Leave out the tasks whose work is queued, not lost; push their leases on.

    A DATA_PROCESSING task waiting for its batches is held by no process (``state.release``):
    only its lease bounds it, renewed by each finished batch. Behind a backlog its batches
    and its merge wait in the queue like any other message, however long that takes, so a
    lease that runs out then says nothing about them. The broker does: while the task's queue
    holds ready messages the task is not judged and its lease runs again from now (for as
    long as a merge may take); once the queue is empty and the lease runs out, its batches or
    its merge are lost and the attempt is counted as today. Without an answer from the broker
    the lease alone judges, as before (a retry finds the staged batches again).
    """
    waiting = [
        t
        for t in tasks
        if t.holder is None and t.waits_for_batches  # type: ignore[attr-defined]
    ]
    if not waiting:
        return tasks
    stats = broker.queue_stats(sorted({t.queue for t in waiting}))
    backlogged = {s.name for s in stats if s.messages}
    queued = [t for t in waiting if t.queue in backlogged]
    if not queued:
        return tasks
    for task in queued:
        # Never shortened; one guarded UPDATE per task whose batches are queued past its lease.
        state.renew_lease(task.pk, seconds=task.timeout_s + settings.QW_LEASE_SECONDS, now=now)
    logger.info("%d tasks wait for batches queued behind a backlog: leases renewed", len(queued))
    skip = {t.pk for t in queued}
    return [t for t in tasks if t.pk not in skip]


def forget_heartbeats(*, now: datetime | None = None) -> int:
    """Remove heartbeat rows of processes long gone (a SIGKILLed process leaves its row)."""
    now = now or liveness.db_now()
    gone_before = now - timedelta(seconds=max(HEARTBEAT_KEEP_S, 10 * settings.QW_LEASE_SECONDS))
    deleted, _ = WorkerHeartbeat.objects.filter(beat_at__lt=gone_before).delete()
    return deleted
