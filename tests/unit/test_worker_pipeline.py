"""The worker pipeline (``tasks_app.worker.run``) called directly, on the real database.

No Celery worker runs: the broker seam ``tasks_app.dispatch.publish`` is replaced by a
recorder, and throwaway handler types are registered per test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db.models import F
from django.utils import timezone

from tasks_app import dispatch, state, worker
from tasks_app.errors import PermanentError, RetryableError
from tasks_app.handlers import registry
from tasks_app.models import FailureClass, Task, TaskLog, TaskStatus
from tests.unit._helpers import log_events, make_task

S = TaskStatus
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _settings(settings: Any) -> None:
    settings.QW_ETA_MAX_SECONDS = 60
    settings.QW_LEASE_SECONDS = 30
    settings.QW_BACKOFF_BASE_S = 2.0
    settings.QW_BACKOFF_CAP_S = 600.0


@pytest.fixture
def handler_type() -> Iterator[Callable[..., str]]:
    """Register a handler under a fresh type name for one test; return the name."""
    names: list[str] = []

    def register(func: Callable[[Any, Any], Any], schema: dict[str, Any] | None = None) -> str:
        name = f"TEST_{uuid.uuid4().hex[:12].upper()}"
        registry.register(name, schema=schema or {"type": "object"})(func)
        names.append(name)
        return name

    yield register
    for name in names:
        registry._specs.pop(name, None)  # the registry has no public unregister


def _raises(exc: BaseException) -> Callable[[Any, Any], Any]:
    def handler(ctx: Any, payload: Any) -> Any:
        raise exc

    return handler


def _run(task: Task) -> worker.Outcome:
    return worker.run(str(task.id), timeout_s=task.timeout_s, worker="w1")


# --- success -----------------------------------------------------------------------------------


def test_noop_task_completed(published):
    task = make_task(type="NOOP", payload={"result": 5})

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.COMPLETED)
    row = Task.objects.get(id=task.id)
    assert row.status == S.COMPLETED
    assert row.result == {"ok": True, "attempt": 1, "result": 5}
    assert row.finished_at is not None and row.lease_expires_at is None
    assert log_events(task.id) == ["started", "completed"]
    assert published == []


def test_handler_sees_task_context_and_lease(handler_type):
    seen: dict[str, Any] = {}

    def handler(ctx: Any, payload: Any) -> Any:
        row = Task.objects.get(id=ctx.task_id)
        seen.update(
            attempt=ctx.attempt,
            retries=ctx.retries,
            max_retries=ctx.max_retries,
            timeout_s=ctx.timeout_s,
            lease=row.lease_expires_at,
            payload=payload,
        )
        ctx.log("progress", "half way", {"done": 1})
        return {"n": 1}

    task = make_task(
        type=handler_type(handler),
        status=S.RETRYING,
        attempt=1,
        retries=1,
        max_retries=5,
        timeout_s=10,
        payload={"k": "v"},
    )
    before = timezone.now()

    assert _run(task).status == "completed"

    # backstop lease = the hard time limit (time limit + 10 s) + QW_LEASE_SECONDS, from the claim
    assert (
        before + timedelta(seconds=50)
        <= seen.pop("lease")
        <= timezone.now() + timedelta(seconds=50)
    )
    assert seen == {
        "attempt": 2,
        "retries": 1,
        "max_retries": 5,
        "timeout_s": 10,
        "payload": {"k": "v"},
    }
    progress = TaskLog.objects.get(task_id=task.id, event="progress")
    assert progress.data == {"done": 1, "attempt": 2}


def test_second_run_of_completed_task_skipped(handler_type):
    calls: list[Any] = []
    task = make_task(type=handler_type(lambda ctx, p: calls.append(1) or {"ok": True}))
    assert _run(task).status == "completed"

    outcome = _run(task)

    assert outcome.status == "skipped"
    assert calls == [1]
    row = Task.objects.get(id=task.id)
    assert (row.status, row.attempt) == (S.COMPLETED, 1)
    assert log_events(task.id) == ["started", "completed"]


# --- failures ----------------------------------------------------------------------------------


def test_unknown_type_failed_non_retryable(published):
    task = make_task(type="TEST_NEVER_REGISTERED", max_retries=3)

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.NON_RETRYABLE)
    row = Task.objects.get(id=task.id)
    assert (row.status, row.failure_class) == (S.FAILED, FailureClass.NON_RETRYABLE)
    assert "no handler registered for type TEST_NEVER_REGISTERED" in row.error
    assert row.retries == 0
    assert published == []


def test_retryable_error_with_retries_left_retrying_and_published(handler_type, published):
    # given a task whose handler fails transiently, with a 2 s backoff and no jitter
    task = make_task(
        type=handler_type(_raises(RetryableError("flaky upstream"))),
        retries=0,
        max_retries=3,
        retry_backoff_s=2.0,
        retry_jitter=False,
    )
    before = timezone.now()

    # when the worker runs it
    outcome = _run(task)

    # then it waits 2 s as RETRYING, woken by a countdown message of 2 s
    assert outcome == worker.Outcome(worker.OutcomeStatus.RETRYING, "in 2.000s")
    row = Task.objects.get(id=task.id)
    assert row.status == S.RETRYING
    assert row.retries == 1
    assert row.error == "flaky upstream"
    assert row.lease_expires_at is None
    assert before + timedelta(seconds=2) <= row.next_attempt_at
    assert row.next_attempt_at <= timezone.now() + timedelta(seconds=2)
    assert row.dispatched_at == row.next_attempt_at
    assert published == [
        [
            dispatch.Wakeup(
                str(task.id), row.type, row.queue, row.priority, row.timeout_s, countdown=2.0
            )
        ]
    ]
    assert log_events(task.id) == ["started", "retry_scheduled"]


def test_retry_with_jitter_publishes_countdown_equal_to_delay(handler_type, published):
    task = make_task(
        type=handler_type(_raises(RetryableError("flaky"))),
        retries=2,
        max_retries=5,
        retry_backoff_s=1.0,
        retry_jitter=True,
    )

    assert _run(task).status == "retrying"

    [[wakeup]] = published
    assert 0.0 <= wakeup.countdown <= 4.0  # full jitter under the ceiling: 1 s * 2**2
    log = TaskLog.objects.get(task_id=task.id, event="retry_scheduled")
    assert log.data["delay_s"] == round(wakeup.countdown, 3)


def test_retry_after_honoured_as_countdown(handler_type, published):
    task = make_task(
        type=handler_type(_raises(RetryableError("429", retry_after=5.0))), max_retries=3
    )

    assert _run(task) == worker.Outcome(worker.OutcomeStatus.RETRYING, "in 5.000s")

    assert [w.countdown for w in published[0]] == [5.0]


def test_long_backoff_left_to_dispatcher_not_published(handler_type, published):
    # given a backoff longer than QW_ETA_MAX_SECONDS (60 s)
    task = make_task(
        type=handler_type(_raises(RetryableError("down"))),
        max_retries=3,
        retry_backoff_s=120.0,
        retry_jitter=False,
    )

    # when it fails
    outcome = _run(task)

    # then the wait is held in the database, with no message in flight
    assert outcome.status == "retrying"
    row = Task.objects.get(id=task.id)
    assert row.status == S.RETRYING
    assert row.next_attempt_at > timezone.now() + timedelta(seconds=100)
    assert row.dispatched_at is None
    assert published == []


def test_retries_exhausted_failed(handler_type, published):
    task = make_task(
        type=handler_type(_raises(RetryableError("still down"))), retries=3, max_retries=3
    )

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.RETRIES_EXHAUSTED)
    row = Task.objects.get(id=task.id)
    assert (row.status, row.failure_class) == (S.FAILED, FailureClass.RETRIES_EXHAUSTED)
    assert (row.retries, row.error) == (3, "still down")
    assert published == []


def test_permanent_error_failed_non_retryable_at_once(handler_type, published):
    task = make_task(type=handler_type(_raises(PermanentError("bad request"))), max_retries=3)

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.NON_RETRYABLE)
    row = Task.objects.get(id=task.id)
    assert (row.status, row.failure_class, row.error) == (
        S.FAILED,
        FailureClass.NON_RETRYABLE,
        "bad request",
    )
    assert row.retries == 0
    assert published == []


def test_handler_bug_failed_naming_exception(handler_type):
    task = make_task(type=handler_type(lambda ctx, payload: payload["missing"]), max_retries=3)

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.NON_RETRYABLE)
    row = Task.objects.get(id=task.id)
    assert row.status == S.FAILED
    assert row.error == "KeyError: 'missing'"


def test_long_error_truncated(handler_type):
    task = make_task(type=handler_type(_raises(PermanentError("x" * 10_000))))

    _run(task)

    assert len(Task.objects.get(id=task.id).error) == worker.MAX_ERROR_CHARS


@pytest.mark.parametrize(
    "result",
    [{"when": object()}, float("nan"), {"tags": {"a", "b"}}],
    ids=["object", "nan", "set"],
)
def test_non_json_result_failed(handler_type, result):
    task = make_task(type=handler_type(lambda ctx, payload: result))

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.NON_RETRYABLE)
    row = Task.objects.get(id=task.id)
    assert row.status == S.FAILED
    assert row.error.startswith("result is not JSON")
    assert row.result is None


def test_result_with_nul_character_failed(handler_type):
    task = make_task(type=handler_type(lambda ctx, payload: {"text": "a\x00b"}))

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.NON_RETRYABLE)
    assert Task.objects.get(id=task.id).status == S.FAILED


def test_error_with_nul_character_failed(handler_type):
    task = make_task(type=handler_type(_raises(PermanentError("bad byte \x00 in input"))))

    outcome = _run(task)

    assert outcome == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.NON_RETRYABLE)
    row = Task.objects.get(id=task.id)
    assert row.status == S.FAILED
    assert "bad byte" in row.error


def test_timeout_with_retries_left_retrying(handler_type, published):
    task = make_task(
        type=handler_type(_raises(SoftTimeLimitExceeded())), max_retries=1, timeout_s=7
    )

    assert _run(task).status == "retrying"

    row = Task.objects.get(id=task.id)
    assert (row.status, row.error) == (S.RETRYING, "timed out after 7s")


def test_timeout_without_retries_failed_timeout(handler_type):
    task = make_task(type=handler_type(_raises(SoftTimeLimitExceeded())), max_retries=0)

    assert _run(task) == worker.Outcome(worker.OutcomeStatus.FAILED, FailureClass.TIMEOUT)

    assert Task.objects.get(id=task.id).failure_class == FailureClass.TIMEOUT


# --- cancellation and fencing ------------------------------------------------------------------


def test_cancel_requested_before_start_cancelled_without_running(handler_type):
    calls: list[Any] = []
    task = make_task(
        S.RETRYING,
        type=handler_type(lambda ctx, p: calls.append(1)),
        cancel_requested=True,
        attempt=1,
        retries=1,
    )

    outcome = _run(task)

    assert outcome.status == "cancelled"
    assert calls == []
    row = Task.objects.get(id=task.id)
    assert row.status == S.CANCELLED
    assert row.finished_at is not None
    assert log_events(task.id) == ["started", "cancelled"]


def test_cancel_requested_while_running_cancelled_at_next_check(handler_type):
    def handler(ctx: Any, payload: Any) -> Any:
        state.request_cancel(ctx.task_id, by="alice")
        ctx.check_cancelled()
        return {"reached": "end"}

    task = make_task(type=handler_type(handler))

    assert _run(task) == worker.Outcome(worker.OutcomeStatus.CANCELLED)

    row = Task.objects.get(id=task.id)
    assert (row.status, row.result) == (S.CANCELLED, None)
    assert log_events(task.id) == ["started", "cancel_requested", "cancelled"]


def test_result_of_superseded_attempt_discarded(handler_type):
    # given a handler that outlives its lease: meanwhile another worker claims the task
    def handler(ctx: Any, payload: Any) -> Any:
        Task.objects.filter(id=ctx.task_id).update(attempt=F("attempt") + 1)
        return {"late": True}

    task = make_task(type=handler_type(handler))

    # when it returns
    outcome = _run(task)

    # then its result is dropped: the attempt is no longer the task's
    assert outcome.status == "stale"
    row = Task.objects.get(id=task.id)
    assert (row.status, row.result) == (S.PROCESSING, None)
    assert "completed" not in log_events(task.id)


def test_noop_fail_times_retries_then_completes(published):
    # given a NOOP that fails its first attempt on purpose
    task = make_task(
        type="NOOP",
        payload={"fail_times": 1},
        max_retries=3,
        retry_backoff_s=30.0,
        retry_jitter=False,
    )

    # when the first attempt fails, a message arriving before the backoff is refused,
    first = _run(task)
    early = _run(task)
    # and once the task is due it runs again
    Task.objects.filter(id=task.id).update(next_attempt_at=timezone.now())
    second = _run(task)

    # then it completed on its second attempt
    assert (first.status, early.status, second.status) == ("retrying", "skipped", "completed")
    row = Task.objects.get(id=task.id)
    assert (row.status, row.attempt, row.retries) == (S.COMPLETED, 2, 1)
    assert row.result["attempt"] == 2
    assert [w.countdown for [w] in published] == [30.0]


def test_database_error_under_the_handler_is_a_retry_not_a_bug(handler_type, published):
    from django.db import OperationalError

    task = make_task(
        type=handler_type(_raises(OperationalError("server closed the connection"))), max_retries=2
    )

    outcome = _run(task)

    assert outcome.status == "retrying"
    row = Task.objects.get(id=task.id)
    assert row.status == S.RETRYING and "database unavailable" in row.error
