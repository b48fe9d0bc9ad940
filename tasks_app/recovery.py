"""The dispatcher of due work and the recovery sweep (run by beat, DESIGN §6).

- ``dispatch_due`` publishes waiting tasks that are due and have no message in flight: delayed
  and scheduled tasks, long backoffs, tasks whose publish failed (``dispatched_at`` null), and
  tasks whose message was lost (published more than ``QW_REDISPATCH_SECONDS`` ago, still
  waiting). A duplicate message is harmless: the claim admits one.
- ``expire_leases`` turns PROCESSING tasks whose lease ran out (their worker died) into a
  failed attempt of class ``worker_lost``: RETRYING while retries remain, else FAILED. A task
  that kills its worker every time therefore ends FAILED after ``max_retries``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from tasks_app import dispatch, state
from tasks_app.models import WAITING_STATUSES, LogLevel, Task, TaskLog, TaskStatus
from tasks_app.worker import retry_delay

logger = logging.getLogger(__name__)

BATCH = 1000
MAX_BATCHES = 20


def dispatch_due(*, now: datetime | None = None, batch: int = BATCH) -> int:
    """Publish due waiting tasks that have no live message; return how many were published."""
    total = 0
    for _ in range(MAX_BATCHES):
        published = _dispatch_batch(now or timezone.now(), batch)
        total += published
        if published < batch:
            break
    return total


def _dispatch_batch(now: datetime, batch: int) -> int:
    lost_before = now - timedelta(seconds=settings.QW_REDISPATCH_SECONDS)
    with transaction.atomic():
        due = list(
            Task.objects.select_for_update(skip_locked=True)
            .filter(status__in=WAITING_STATUSES, next_attempt_at__lte=now)
            .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=lost_before))
            .order_by("next_attempt_at")
            .only("id", "type", "queue", "priority", "timeout_s", "dispatched_at")[:batch]
        )
        if not due:
            return 0
        Task.objects.filter(id__in=[t.id for t in due]).update(dispatched_at=now)
        lost = [t for t in due if t.dispatched_at is not None]
        if lost:
            TaskLog.objects.bulk_create(
                TaskLog(
                    task=t,
                    level=LogLevel.WARNING,
                    event="redispatched",
                    message="no worker took its message in time: published again",
                )
                for t in lost
            )
            logger.warning("redispatching %d tasks whose message was lost", len(lost))
        dispatch.publish_on_commit([dispatch.wakeup_for(t) for t in due])
    return len(due)


def expire_leases(*, now: datetime | None = None, batch: int = BATCH) -> int:
    now = now or timezone.now()
    expired = list(
        Task.objects.filter(status=TaskStatus.PROCESSING, lease_expires_at__lt=now)
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
        )[:batch]
    )
    count = 0
    for task in expired:
        retry = task.retries < task.max_retries
        delay = retry_delay(task) if retry else 0.0
        with transaction.atomic():
            run = None
            if task.workflow_run_id is not None and not retry:
                from workflows_app import coordinator

                run = coordinator.lock_run(task.workflow_run_id)  # run row first, then task's
            expired_task = state.expire_lease(task, retry=retry, delay_s=delay, now=now)
            if expired_task is not None:
                count += 1
                if run is not None:
                    coordinator.task_finished(expired_task, run=run)
    if count:
        logger.warning("%d tasks lost their worker (lease expired)", count)
    return count
