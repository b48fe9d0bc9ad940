"""The worker pipeline: claim → run the handler under its time limit → record the outcome.

1. Claim: PENDING/RETRYING → PROCESSING, bumping ``attempt`` (the fencing token) and naming
   this process as the holder: its heartbeat (``tasks_app.liveness``) keeps the attempt alive.
   A backstop lease (the hard time limit plus ``QW_LEASE_SECONDS``) bounds a holder that lives
   but never finishes. A message for a task that is not due, already running or finished
   claims nothing and is dropped: the database decides.
2. Run the type's handler with a ``TaskContext``; Celery's soft time limit interrupts it.
3. Record: COMPLETED with the result; or classify the error — retryable with retries left →
   RETRYING after exponential backoff with full jitter (short waits ride a countdown message,
   long ones wait in the database for the dispatcher); anything else → FAILED with its
   ``failure_class``, which is the dead-letter record.
Every write of steps 1 and 3 is fenced by the attempt, so a late or duplicated delivery
never completes a task twice. A step 3 write that fails because the database is away is tried
again until it is back (for up to ``FINISH_RETRY_S``): the outcome is only in this process, and
its heartbeat would otherwise keep the task PROCESSING until the backstop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction

from queueworker import logcontext
from tasks_app import dispatch, liveness, state
from tasks_app.backoff import backoff_delay
from tasks_app.errors import Deferred, PermanentError, RetryableError, TaskCancelled
from tasks_app.handlers.registry import registry  # the package registers the built-ins
from tasks_app.models import FailureClass, Task, TaskLog

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
# A finishing write is retried while the database is away, this long at most, backing off
# from FINISH_RETRY_FIRST_S to FINISH_RETRY_CAP_S between tries.
FINISH_RETRY_S = 120.0
FINISH_RETRY_FIRST_S = 0.25
FINISH_RETRY_CAP_S = 2.0

T = TypeVar("T")


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
    task = state.claim(
        task_id, lease_s=backstop_lease_s(timeout_s), worker=worker, holder=liveness.holder()
    )
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
        # Its batches run elsewhere: this process no longer holds it; their lease bounds it.
        _durably(lambda: state.release(task.id, task.attempt))
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
        updated = _durably(
            lambda: state.schedule_retry(
                task.id, task.attempt, error=error, delay_s=delay, published=published
            )
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


def backstop_lease_s(timeout_s: int) -> float:
    """The lease a claim takes: past Celery's hard time limit, plus ``QW_LEASE_SECONDS`` for
    the kill to be seen. A live holder finishes or is killed before it; a dead one is found
    sooner by its heartbeat."""
    return timeout_s + dispatch.HARD_LIMIT_GRACE_S + settings.QW_LEASE_SECONDS


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
        return _durably(transition)
    from workflows_app import coordinator

    def in_transaction() -> bool:
        with transaction.atomic():
            run = coordinator.lock_run(task.workflow_run_id)  # run row first, then the task's
            done = transition()
            if done:
                coordinator.task_finished(task, run=run)
            return done

    return _durably(in_transaction)


def _durably(write: Callable[[], T]) -> T:
    """Run ``write``; while the database is away, reconnect and try again (bounded).

    A write whose commit reached the database before the connection broke is refused the
    second time by its guard (the task moved on), which reads as "stale": never twice. Inside
    a caller's transaction nothing can be retried, so the error propagates at once.
    """
    started = time.monotonic()
    pause = FINISH_RETRY_FIRST_S
    while True:
        try:
            result = write()
        except (OperationalError, InterfaceError) as exc:
            if any(c.in_atomic_block for c in connections.all(initialized_only=True)):
                raise
            if time.monotonic() + pause > started + FINISH_RETRY_S:
                raise
            if pause == FINISH_RETRY_FIRST_S:
                logger.warning("database unavailable to record the outcome, retrying: %s", exc)
            for conn in connections.all(initialized_only=True):
                conn.close_if_unusable_or_obsolete()
            time.sleep(pause)
            pause = min(pause * 2, FINISH_RETRY_CAP_S)
            continue
        if pause != FINISH_RETRY_FIRST_S:
            logger.info("outcome recorded after %.1f s", time.monotonic() - started)
        return result
