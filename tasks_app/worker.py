"""The worker pipeline: claim → run the handler under its time limit → record the outcome.

1. Claim: PENDING/RETRYING → PROCESSING, bumping ``attempt`` (the fencing token) and taking a
   lease of the task's time limit plus ``QW_LEASE_SECONDS``. A message for a task that is not
   due, already running or finished claims nothing and is dropped: the database decides.
2. Run the type's handler with a ``TaskContext``; Celery's soft time limit interrupts it.
3. Record: COMPLETED with the result; or classify the error — retryable with retries left →
   RETRYING after exponential backoff with full jitter (short waits ride a countdown message,
   long ones wait in the database for the dispatcher); anything else → FAILED with its
   ``failure_class``, which is the dead-letter record.
Every write of steps 1 and 3 is fenced by the attempt, so a late or duplicated delivery
never completes a task twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction

from queueworker import logcontext
from tasks_app import dispatch, state
from tasks_app.backoff import backoff_delay
from tasks_app.errors import Deferred, PermanentError, RetryableError, TaskCancelled
from tasks_app.handlers.registry import registry  # the package registers the built-ins
from tasks_app.models import FailureClass, Task, TaskLog

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


class TaskContext:
    """What a handler sees of its task while it runs."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.task_id = task.id
        self.attempt = task.attempt
        self.retries = task.retries
        self.max_retries = task.max_retries
        self.timeout_s = task.timeout_s

    def check_cancelled(self) -> None:
        """Raise ``TaskCancelled`` if a cancel was requested since the task started."""
        if Task.objects.filter(id=self.task_id, cancel_requested=True).exists():
            raise TaskCancelled("cancellation requested")

    def log(self, event: str, message: str, data: dict[str, Any] | None = None) -> None:
        TaskLog.objects.create(
            task_id=self.task_id,
            event=event,
            message=message,
            data={**(data or {}), "attempt": self.attempt},
        )


@dataclass(frozen=True)
class Outcome:
    status: str  # completed | retrying | failed | cancelled | skipped | stale
    detail: str = ""


def run(task_id: str, *, timeout_s: int, worker: str = "") -> Outcome:
    lease_s = timeout_s + settings.QW_LEASE_SECONDS
    task = state.claim(task_id, lease_s=lease_s, worker=worker)
    if task is None:
        return Outcome("skipped", "not claimable (finished, running elsewhere, or not due)")
    logcontext.update(type=task.type, attempt=task.attempt, workflow_run_id=task.workflow_run_id)
    if task.cancel_requested:
        _finishing(task, lambda: state.cancel_running(task.id, task.attempt))
        return Outcome("cancelled", "cancel requested before start")
    spec = registry.get(task.type)
    if spec is None:
        return finish_failed(task, f"no handler registered for type {task.type}", retryable=False)
    if task.workflow_run_id is not None:
        # A workflow step's payload was completed by $ref values when it started: check it now.
        problems = spec.validate(task.payload)
        if problems:
            detail = "; ".join(f"{path or '(root)'}: {message}" for path, message in problems)
            return finish_failed(task, f"invalid payload after $ref: {detail}", retryable=False)
    try:
        result = spec.func(TaskContext(task), task.payload)
    except TaskCancelled:
        return finish_cancelled(task)
    except Deferred as exc:
        return Outcome("deferred", str(exc))
    except SoftTimeLimitExceeded:
        return finish_failed(
            task,
            f"timed out after {task.timeout_s}s",
            retryable=True,
            failure_class=FailureClass.TIMEOUT,
        )
    except RetryableError as exc:
        return finish_failed(task, str(exc), retryable=True, retry_after=exc.retry_after)
    except PermanentError as exc:
        return finish_failed(task, str(exc), retryable=False)
    except (OperationalError, InterfaceError) as exc:
        # The database went away under the handler (a restart): transient, so a retry; if it
        # is still away, recording this raises and the message is retried instead.
        return finish_failed(task, f"database unavailable: {exc}", retryable=True)
    except Exception as exc:
        # A handler bug: retrying cannot fix it, so it fails at once with the exception named.
        logger.exception("handler %s raised", task.type)
        return finish_failed(task, f"{type(exc).__name__}: {exc}", retryable=False)
    return finish_completed(task, result)


def finish_completed(task: Task, result: Any) -> Outcome:
    """Record a handler's result (also for work that finishes a deferred task)."""
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return finish_failed(task, f"result is not JSON: {exc}", retryable=False)
    if _contains_nul(result):  # PostgreSQL's jsonb cannot store NUL characters
        return finish_failed(task, "result contains a NUL character (\\u0000)", retryable=False)
    if _finishing(task, lambda: state.complete(task.id, task.attempt, result)):
        return Outcome("completed")
    return Outcome("stale", "completion discarded: the task had moved on")


def finish_cancelled(task: Task) -> Outcome:
    if _finishing(task, lambda: state.cancel_running(task.id, task.attempt)):
        return Outcome("cancelled")
    return Outcome("stale", "cancelled, but the task had moved on")


def finish_failed(
    task: Task,
    error: str,
    *,
    retryable: bool,
    retry_after: float | None = None,
    failure_class: str = FailureClass.RETRIES_EXHAUSTED,
) -> Outcome:
    """Record a failed attempt (also of a deferred task, by its merge): a retry after backoff
    while retries remain and the error is retryable, else FAILED with its failure class."""
    # PostgreSQL text cannot hold NUL; an error message must never make its own write fail.
    error = error.replace("\x00", "\\0")[:MAX_ERROR_CHARS]
    if retryable and task.retries < task.max_retries:
        delay = retry_delay(task, retry_after=retry_after)
        published = delay <= settings.QW_ETA_MAX_SECONDS
        updated = state.schedule_retry(
            task.id, task.attempt, error=error, delay_s=delay, published=published
        )
        if updated is None:
            return Outcome("stale", "retry discarded: the task had moved on")
        if published:
            dispatch.publish([dispatch.wakeup_for(updated, countdown=delay)])
        return Outcome("retrying", f"in {delay:.3f}s")
    final_class = failure_class if retryable else FailureClass.NON_RETRYABLE
    failed = _finishing(
        task,
        lambda: (
            state.fail(task.id, task.attempt, error=error, failure_class=final_class) is not None
        ),
    )
    if not failed:
        return Outcome("stale", "failure discarded: the task had moved on")
    return Outcome("failed", final_class)


def retry_delay(task: Task, *, retry_after: float | None = None) -> float:
    return backoff_delay(
        task.retries,
        base_s=task.retry_backoff_s
        if task.retry_backoff_s is not None
        else settings.QW_BACKOFF_BASE_S,
        cap_s=task.retry_backoff_max_s
        if task.retry_backoff_max_s is not None
        else settings.QW_BACKOFF_CAP_S,
        jitter=task.retry_jitter,
        retry_after=retry_after,
    )


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_contains_nul(item) for item in value)
    return False


def _finishing(task: Task, transition: Callable[[], bool]) -> bool:
    """Apply a terminal transition; for a workflow's task, let the coordinator decide what
    follows in the same transaction, so that the decision can never be lost."""
    if task.workflow_run_id is None:
        return transition()
    from workflows_app import coordinator

    with transaction.atomic():
        run = coordinator.lock_run(task.workflow_run_id)  # run row first, then the task's
        done = transition()
        if done:
            coordinator.task_finished(task, run=run)
        return done
