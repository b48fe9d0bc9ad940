"""Celery entry points: thin wrappers that load ids from the message and call one service."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import Task as CeleryTask
from celery.exceptions import Reject
from django.db import InterfaceError, OperationalError, connections

from queueworker import logcontext
from queueworker.celery import app
from queueworker.messaging import DATA_QUEUE, DEFAULT_QUEUE
from queueworker.tasking import instrumented_task
from tasks_app import worker
from tasks_app.dead_letters import DeadLetterConsumer
from tasks_app.dispatch import EXECUTE_TASK
from tasks_app.models import Task

logger = logging.getLogger(__name__)

# Every worker also records what lands on tasks.dead_letter (see tasks_app/dead_letters.py).
app.steps["consumer"].add(DeadLetterConsumer)

DB_RETRY_MAX = 100
DB_RETRY_CAP_S = 10
MAX_TASK_IDS = 500  # ids in one message, at most


@instrumented_task(name=EXECUTE_TASK, queue=DEFAULT_QUEUE, bind=True, max_retries=DB_RETRY_MAX)
def execute_task(
    self: CeleryTask,
    taskType: str = "",  # message field names are part of the contract
    taskId: str = "",  # a message without one is refused below (not a TypeError in the pool)
    delay: float = 0,
    metadata: dict[str, Any] | None = None,
    taskIds: Any = None,  # several tasks of one type and queue, taskId first
) -> str:
    """Run one task, or several: the message is a wake-up; the database rows say what to do."""
    try:
        task_id = str(uuid.UUID(str(taskId)))
    except ValueError:
        raise Reject(f"invalid taskId {taskId!r}", requeue=False) from None
    timeout_s = _timeout_from(metadata)
    hostname = self.request.hostname or ""
    request_id = logcontext.valid_request_id((metadata or {}).get("request_id"))
    if taskIds is not None:
        task_ids = _task_ids_from(taskIds, task_id)
        if len(task_ids) > 1:
            return _execute_many(self, task_ids, timeout_s, hostname, request_id)
    started = time.monotonic()
    # The pipeline adds type, attempt and workflow_run_id once it has claimed the row.
    with logcontext.bind(task_id=task_id, request_id=request_id):
        try:
            outcome = worker.run(task_id, timeout_s=timeout_s, worker=hostname)
            if (
                outcome.status == worker.OutcomeStatus.SKIPPED
                and not Task.objects.filter(id=task_id).exists()
            ):
                raise Reject(f"no task {task_id}", requeue=False)
        except (OperationalError, InterfaceError) as exc:
            # The database is restarting or unreachable: drop the broken connection (Celery
            # keeps connections across tasks), wait and try again; the row is unchanged.
            close_broken_connections()
            countdown = _io_backoff(self.request.retries)
            logger.warning("database unavailable for task %s, retrying in %ss", task_id, countdown)
            raise self.retry(exc=exc, countdown=countdown) from exc
        _log_outcome(outcome, (time.monotonic() - started) * 1000)
    return outcome.status


def _task_ids_from(value: Any, first: str) -> list[str]:
    """The ids of a message that wakes several tasks; a malformed list refuses the message."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TASK_IDS:
        raise Reject(f"invalid taskIds: a list of 1 to {MAX_TASK_IDS} ids expected", requeue=False)
    try:
        ids = [str(uuid.UUID(str(item))) for item in value]
    except ValueError:
        raise Reject("invalid taskIds: an item is not a UUID", requeue=False) from None
    if first not in ids:
        raise Reject("invalid taskIds: taskId is not among them", requeue=False)
    return list(dict.fromkeys([first, *ids]))


def _execute_many(
    self: CeleryTask, task_ids: list[str], timeout_s: int, hostname: str, request_id: str | None
) -> str:
    started = time.monotonic()
    with logcontext.bind(task_id=task_ids[0], request_id=request_id):
        try:
            report = worker.run_batch(task_ids, timeout_s=timeout_s, worker=hostname)
            if not report.claimed and not report.republished:
                if not Task.objects.filter(id__in=task_ids).exists():
                    raise Reject(f"no task among {len(task_ids)} ids", requeue=False)
        except (OperationalError, InterfaceError) as exc:
            # As for one task: what was recorded stays recorded; a new delivery of the message
            # claims only the tasks still claimable.
            close_broken_connections()
            countdown = _io_backoff(self.request.retries)
            logger.warning(
                "database unavailable for %d tasks, retrying in %ss", len(task_ids), countdown
            )
            raise self.retry(exc=exc, countdown=countdown) from exc
        duration_ms = (time.monotonic() - started) * 1000
        summary = ", ".join(f"{n} {status}" for status, n in sorted(report.outcomes.items()))
        if report.republished:
            summary += f", {report.republished} published again"
        logger.log(
            logging.WARNING if report.outcomes.get("failed") else logging.INFO,
            "%d tasks in %.1f ms: %s",
            len(task_ids),
            duration_ms,
            summary,
            extra={"outcome": "batch", "duration_ms": round(duration_ms, 1)},
        )
    return "batch"


# DATA_PROCESSING's chord (tasks_app/batches.py). Each is sent to its task's own queue; the
# batch keeps a result so that the chord (django-celery-results) counts it.
BATCH_RETRIES = 5
MERGE_WAITS = 120


@instrumented_task(
    name="tasks_app.data_batch",
    queue=DATA_QUEUE,
    bind=True,
    ignore_result=False,
    max_retries=BATCH_RETRIES,
)
def data_batch_task(self: CeleryTask, task_id: str, index: int) -> str:
    """Run one batch. A failed read or write retries this batch alone; at the last retry
    the batch is recorded FAILED and the chord still completes, so the merge can say why."""
    from tasks_app import batches  # Polars: loaded by the worker (worker_signals), not beat

    with logcontext.bind(task_id=task_id):
        try:
            return batches.batch_run(task_id, index)
        except (OSError, OperationalError, InterfaceError) as exc:
            close_broken_connections()
            if self.request.retries >= BATCH_RETRIES:
                return batches.batch_failed(task_id, index, f"{type(exc).__name__}: {exc}")
            countdown = _io_backoff(self.request.retries)
            logger.warning(
                "batch %s of task %s: %s; retrying in %ss", index, task_id, exc, countdown
            )
            raise self.retry(exc=exc, countdown=countdown) from exc


@instrumented_task(
    name="tasks_app.data_merge", queue=DATA_QUEUE, bind=True, max_retries=MERGE_WAITS
)
def data_merge_task(self: CeleryTask, task_id: str, attempt: int) -> str:
    """The chord's callback: merge the batches and finish the task (docs/task-types.md)."""
    from tasks_app import batches  # Polars: loaded by the worker (worker_signals), not beat

    with logcontext.bind(task_id=task_id):
        try:
            outcome = batches.merge_run(task_id, attempt)
        except (OSError, OperationalError, InterfaceError) as exc:
            close_broken_connections()
            raise self.retry(exc=exc, countdown=_io_backoff(self.request.retries)) from exc
        if outcome == batches.BatchOutcome.WAITING:
            # A batch redelivered after its result was stored counts twice in the chord: the
            # rows, not the chord, say when all are done. Past the waits, the lease decides.
            if self.request.retries < MERGE_WAITS:
                raise self.retry(countdown=1)
        logger.info("merge of task %s: %s", task_id, outcome)
        return outcome


def _io_backoff(retries: int) -> int:
    """Seconds before trying again after the database or the storage failed: 1, 2, 4, 8, 10."""
    return min(DB_RETRY_CAP_S, 2 ** min(retries, 4))


def _log_outcome(outcome: worker.Outcome, duration_ms: float) -> None:
    """One line per message handled, with the task's context: what became of it, how long."""
    detail = f": {outcome.detail}" if outcome.detail else ""
    logger.log(
        logging.WARNING if outcome.status == worker.OutcomeStatus.FAILED else logging.INFO,
        "task %s in %.1f ms%s",
        outcome.status,
        duration_ms,
        detail,
        extra={"outcome": outcome.status, "duration_ms": round(duration_ms, 1)},
    )


def _timeout_from(metadata: dict[str, Any] | None) -> int:
    from django.conf import settings

    try:
        value = int((metadata or {}).get("timeout_s", settings.QW_MAX_TIMEOUT_S))
    except (TypeError, ValueError):
        value = settings.QW_MAX_TIMEOUT_S
    return max(1, min(value, settings.QW_MAX_TIMEOUT_S))


def close_broken_connections() -> None:
    """Close connections that raised: the next task reconnects instead of failing again.

    Connections are kept across tasks and not health-checked before each one (that costs a
    round trip per task); a broken one is found by the error it raises, and closed here.
    """
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()
