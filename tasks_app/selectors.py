"""Reads on tasks: owner scoping and the "why is it not running?" explanation."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, QuerySet
from django.utils import timezone

from tasks_app.models import Task, TaskLog, TaskStatus
from tasks_app.task_types import TaskType


def task_queryset(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Task]:
    """Tasks the user may see: their own, or all for staff (another user's id is a 404)."""
    qs = Task.objects.all()
    if not getattr(user, "is_staff", False):
        qs = qs.filter(owner_id=user.pk)
    return qs


def task_logs(task: Task) -> QuerySet[TaskLog]:
    return TaskLog.objects.filter(task=task).order_by("created_at", "id")


def wait_reason(
    task: Task, now: datetime | None = None, *, ask_broker: bool = True
) -> dict[str, Any] | None:
    """Why a non-terminal task is not (yet) done: ``{code, detail, until?}``; None if terminal."""
    now = now or timezone.now()
    if task.status == TaskStatus.PROCESSING:
        if task.cancel_requested:
            return {
                "code": "cancel_requested",
                "detail": "Cancellation requested; the handler stops at its next check.",
            }
        batches = _batch_progress(task)
        if batches is not None:
            return batches
        return {
            "code": "running",
            "detail": f"Running attempt {task.attempt}.",
            "until": task.lease_expires_at,
        }
    if task.status == TaskStatus.RETRYING:
        if task.next_attempt_at and task.next_attempt_at > now:
            return {
                "code": "backoff",
                "detail": f"Retry {task.retries} of {task.max_retries} after: {task.error}",
                "until": task.next_attempt_at,
            }
        return _queued(task, ask_broker)
    if task.status == TaskStatus.PENDING:
        if task.next_attempt_at and task.next_attempt_at > now:
            return {
                "code": "scheduled",
                "detail": "Scheduled for later.",
                "until": task.next_attempt_at,
            }
        if task.dispatched_at is None:
            return {
                "code": "awaiting_dispatch",
                "detail": "Due; the dispatcher publishes it once the broker accepts messages.",
            }
        return _queued(task, ask_broker)
    return None


def _batch_progress(task: Task) -> dict[str, Any] | None:
    """A DATA_PROCESSING task whose batches run as a chord: how far they are."""
    from tasks_app.models import BatchStatus, DataBatch

    if task.type != TaskType.DATA_PROCESSING:
        return None
    counts = dict(
        DataBatch.objects.filter(job_id=task.pk)
        .values("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    if not counts:
        return None
    total = sum(counts.values())
    return {
        "code": "batches",
        "detail": f"{counts.get(BatchStatus.DONE, 0)} of {total} batches done"
        + (f", {counts[BatchStatus.FAILED]} failed" if counts.get(BatchStatus.FAILED) else "")
        + f" (attempt {task.attempt}).",
        "until": task.lease_expires_at,
    }


def _queued(task: Task, ask_broker: bool) -> dict[str, Any]:
    from queueworker import broker

    if ask_broker and broker.cached_consumers(task.queue) == 0:
        return {
            "code": "no_consumer",
            "detail": f"No worker consumes queue {task.queue}: start "
            f"one with celery -A queueworker worker -Q {task.queue}.",
        }
    return {"code": "queued", "detail": f"Waiting for a worker on queue {task.queue}."}


def dead_letter_queryset(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Task]:
    """Tasks that failed for good: the dead-letter records, newest first."""
    return task_queryset(user).filter(status=TaskStatus.FAILED).order_by("-finished_at")


def stored_result(task: Task, *, part: str = "rows") -> tuple[str, str, str] | None:
    """(storage name, content type, download name) of a result stored as an artifact, or
    None when the result is inline. Raises ``Gone`` once the artifact has expired."""
    from queueworker.errors import Gone
    from tasks_app.models import Artifact

    key = "artifact" if part == "rows" else "invalid_artifact"
    result = task.result
    ref = result.get(key) if isinstance(result, dict) else None
    if not isinstance(ref, dict):
        return None
    artifact = Artifact.objects.filter(pk=str(ref.get("id")), owner_id=task.owner_id).first()
    if artifact is None:
        raise Gone({"detail": f"The stored result {ref.get('id')} has expired."})
    return artifact.name, artifact.content_type, f"{task.id}-{part}.{artifact.format}"
