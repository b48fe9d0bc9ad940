"""The task state machine (``tasks_app.state``) against its table (``tasks_app.transitions``).

Every transition is a guarded UPDATE: it applies exactly when the row's status is one of the
rule's sources (and, for a worker's transitions, the attempt matches), and writes its TaskLog
row in the same statement. Runs on PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tasks_app import state
from tasks_app.models import FailureClass, LogLevel, Task, TaskLog, TaskStatus
from tasks_app.transitions import TRANSITIONS, Transition, allowed, transitions_from
from tests.unit._helpers import log_events, make_task, run_concurrently, snapshot

S = TaskStatus
FENCED = [t for t, rule in TRANSITIONS.items() if rule.fenced]


def _invoke(transition: Transition, task: Task, attempt: int) -> Any:
    """Apply ``transition`` through its own function in ``tasks_app.state``."""
    if transition is Transition.CLAIM:
        return state.claim(task.id, lease_s=30, worker="w1")
    if transition is Transition.COMPLETE:
        return state.complete(task.id, attempt, {"ok": True})
    if transition is Transition.SCHEDULE_RETRY:
        return state.schedule_retry(task.id, attempt, error="boom", delay_s=5, published=True)
    if transition is Transition.FAIL:
        return state.fail(task.id, attempt, error="boom", failure_class=FailureClass.NON_RETRYABLE)
    if transition is Transition.CANCEL:
        return state.cancel(task.id, by="alice")
    if transition is Transition.CANCEL_RUNNING:
        return state.cancel_running(task.id, attempt)
    if transition in (Transition.EXPIRE_LEASE_RETRY, Transition.EXPIRE_LEASE_FAIL):
        seen = Task(id=task.id, attempt=attempt)  # what the sweep read
        return state.expire_lease(
            seen, retry=transition is Transition.EXPIRE_LEASE_RETRY, delay_s=5
        )
    if transition is Transition.REQUEUE:
        return state.requeue(task.id, by="alice")
    raise AssertionError(f"no caller for {transition}")


# --- the table ---------------------------------------------------------------------------------


def test_table_covers_every_transition_with_valid_statuses():
    assert set(TRANSITIONS) == set(Transition)
    for rule in TRANSITIONS.values():
        assert rule.sources and rule.sources <= set(S)
        assert rule.target in set(S)
        assert rule.target not in rule.sources
        assert rule.event


def test_table_fences_exactly_the_transitions_out_of_processing():
    for transition, rule in TRANSITIONS.items():
        assert rule.fenced == (rule.sources == {S.PROCESSING}), transition


def test_table_completed_is_final_and_failed_cancelled_only_requeue():
    assert transitions_from(S.COMPLETED) == set()
    assert transitions_from(S.FAILED) == {Transition.REQUEUE}
    assert transitions_from(S.CANCELLED) == {Transition.REQUEUE}
    assert allowed(Transition.CLAIM, S.RETRYING)
    assert not allowed(Transition.CLAIM, S.PROCESSING)


# --- every (transition, status) ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("status", list(S))
@pytest.mark.parametrize("transition", list(Transition))
def test_transition_applies_only_from_its_sources(transition, status):
    # given a task in `status`, claimed twice before (attempt 2), with an expired lease
    task = make_task(status, attempt=2, retries=1)
    before = snapshot(task.id)
    rule = TRANSITIONS[transition]

    # when the transition is applied with the right attempt
    result = _invoke(transition, task, attempt=2)

    # then it succeeds exactly when the status is a source, with its log row
    logs = list(TaskLog.objects.filter(task_id=task.id))
    if status in rule.sources:
        assert result
        row = Task.objects.get(id=task.id)
        assert row.status == rule.target
        if isinstance(result, Task):
            assert result.id == task.id and result.status == rule.target
        assert [log.event for log in logs] == [rule.event]
        expected_attempt = 3 if transition is Transition.CLAIM else 2
        assert row.attempt == expected_attempt
        assert logs[0].data["attempt"] == expected_attempt
    else:
        assert result in (None, False)
        assert snapshot(task.id) == before
        assert logs == []


@pytest.mark.django_db
@pytest.mark.parametrize("wrong_attempt", [1, 3], ids=["stale", "future"])
@pytest.mark.parametrize("transition", FENCED)
def test_fenced_transition_with_wrong_attempt_refused(transition, wrong_attempt):
    task = make_task(S.PROCESSING, attempt=2)
    before = snapshot(task.id)

    result = _invoke(transition, task, attempt=wrong_attempt)

    assert result in (None, False)
    assert snapshot(task.id) == before
    assert log_events(task.id) == []


@pytest.mark.django_db
@pytest.mark.parametrize("transition", FENCED)
def test_apply_fenced_without_attempt_raises(transition):
    task = make_task(S.PROCESSING)
    before = snapshot(task.id)

    with pytest.raises(ValueError, match="fenced"):
        state.apply(task.id, transition)

    assert snapshot(task.id) == before


@pytest.mark.django_db
def test_apply_unknown_task_returns_none():
    assert state.apply(uuid.uuid4(), Transition.CANCEL) is None
    assert not TaskLog.objects.exists()


# --- claim -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_claim_bumps_attempt_and_sets_lease_and_started_at():
    task = make_task(S.PENDING)
    now = timezone.now()

    claimed = state.claim(task.id, lease_s=45, worker="w1", now=now)

    assert claimed is not None
    row = Task.objects.get(id=task.id)
    assert row.status == S.PROCESSING
    assert row.attempt == claimed.attempt == 1
    assert row.lease_expires_at == now + timedelta(seconds=45)
    assert row.started_at == now
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.message) == ("started", "started on w1")
    assert log.data == {"worker": "w1", "attempt": 1}
    assert log.created_at == now


@pytest.mark.django_db
def test_claim_of_retry_keeps_first_started_at():
    first_start = timezone.now() - timedelta(minutes=5)
    task = make_task(S.RETRYING, attempt=1, retries=1, started_at=first_start)

    claimed = state.claim(task.id, lease_s=30)

    assert claimed is not None and claimed.attempt == 2
    assert Task.objects.get(id=task.id).started_at == first_start


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.PENDING, S.RETRYING])
def test_claim_before_next_attempt_at_refused(status):
    now = timezone.now()
    task = make_task(status, next_attempt_at=now + timedelta(minutes=5))
    before = snapshot(task.id)

    assert state.claim(task.id, lease_s=30, now=now) is None

    assert snapshot(task.id) == before
    assert log_events(task.id) == []


@pytest.mark.django_db
def test_claim_within_one_second_of_due_accepted_beyond_refused():
    # a countdown's ETA may fire a moment early: up to 1 s is tolerated
    now = timezone.now()
    early = make_task(S.RETRYING, next_attempt_at=now + timedelta(milliseconds=500))
    too_early = make_task(S.RETRYING, next_attempt_at=now + timedelta(seconds=2))

    assert state.claim(early.id, lease_s=30, now=now) is not None
    assert state.claim(too_early.id, lease_s=30, now=now) is None


# --- the worker's fenced outcomes --------------------------------------------------------------


@pytest.mark.django_db
def test_complete_stores_result_and_clears_lease_and_error():
    task = make_task(S.PROCESSING, error="earlier attempt failed")
    now = timezone.now()

    assert state.complete(task.id, 1, {"n": [1, 2]}, now=now) is True

    row = Task.objects.get(id=task.id)
    assert row.status == S.COMPLETED
    assert row.result == {"n": [1, 2]}
    assert row.finished_at == now
    assert row.lease_expires_at is None
    assert row.error == "" and row.failure_class == ""
    assert log_events(task.id) == ["completed"]


@pytest.mark.django_db
def test_complete_by_stale_worker_after_reclaim_refused():
    # given attempt 1 lost its lease and the task was claimed again (attempt 2)
    task = make_task(S.PROCESSING, attempt=1)
    assert state.expire_lease(task, retry=True, delay_s=0) is not None
    assert state.claim(task.id, lease_s=30) is not None

    # when the first worker finishes late, then the second finishes
    late = state.complete(task.id, 1, {"by": "first"})
    current = state.complete(task.id, 2, {"by": "second"})

    # then only the current attempt's result counts
    assert (late, current) == (False, True)
    assert Task.objects.get(id=task.id).result == {"by": "second"}
    assert log_events(task.id) == ["lease_expired", "started", "completed"]


@pytest.mark.django_db
@pytest.mark.parametrize("published", [True, False])
def test_schedule_retry_counts_retry_and_sets_due_time(published):
    task = make_task(S.PROCESSING, retries=1)
    now = timezone.now()

    updated = state.schedule_retry(
        task.id, 1, error="boom", delay_s=7.5, published=published, now=now
    )

    assert updated is not None
    row = Task.objects.get(id=task.id)
    assert row.status == S.RETRYING
    assert row.retries == 2
    assert row.next_attempt_at == now + timedelta(seconds=7.5)
    assert row.dispatched_at == (row.next_attempt_at if published else None)
    assert row.lease_expires_at is None
    assert row.error == "boom"
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.level) == ("retry_scheduled", LogLevel.WARNING)
    assert log.data == {"delay_s": 7.5, "error": "boom", "attempt": 1}


@pytest.mark.django_db
def test_fail_records_error_and_failure_class():
    task = make_task(S.PROCESSING)
    now = timezone.now()

    failed = state.fail(task.id, 1, error="bad input", failure_class="non_retryable", now=now)

    assert failed is not None
    row = Task.objects.get(id=task.id)
    assert (row.status, row.error, row.failure_class) == (S.FAILED, "bad input", "non_retryable")
    assert row.finished_at == now and row.lease_expires_at is None
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.level, log.message) == ("failed", LogLevel.ERROR, "bad input")
    assert log.data == {"failure_class": "non_retryable", "attempt": 1}


@pytest.mark.django_db
def test_cancel_running_ends_cancelled_and_clears_lease():
    task = make_task(S.PROCESSING, cancel_requested=True)

    assert state.cancel_running(task.id, 1) is True

    row = Task.objects.get(id=task.id)
    assert row.status == S.CANCELLED
    assert row.finished_at is not None and row.lease_expires_at is None
    assert TaskLog.objects.get(task_id=task.id).message == "cancelled while running"


# --- operator actions --------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.PENDING, S.RETRYING])
def test_cancel_waiting_task_at_once(status):
    task = make_task(status, next_attempt_at=timezone.now() + timedelta(minutes=1))
    now = timezone.now()

    cancelled = state.cancel(task.id, by="alice", now=now)

    assert cancelled is not None
    row = Task.objects.get(id=task.id)
    assert row.status == S.CANCELLED
    assert row.finished_at == now and row.next_attempt_at is None
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.message) == ("cancelled", "cancelled by alice")
    assert log.data["by"] == "alice"


@pytest.mark.django_db
def test_request_cancel_on_processing_sets_flag_not_status():
    task = make_task(S.PROCESSING)

    first = state.request_cancel(task.id, by="alice")
    second = state.request_cancel(task.id, by="bob")

    assert (first, second) == (True, False)
    row = Task.objects.get(id=task.id)
    assert row.status == S.PROCESSING
    assert row.cancel_requested is True
    log = TaskLog.objects.get(task_id=task.id)  # one row: the repeat changed nothing
    assert log.event == "cancel_requested" and log.data == {"by": "alice"}


@pytest.mark.django_db
@pytest.mark.parametrize("status", [s for s in S if s != S.PROCESSING])
def test_request_cancel_on_non_processing_refused(status):
    task = make_task(status)
    before = snapshot(task.id)

    assert state.request_cancel(task.id) is False

    assert snapshot(task.id) == before
    assert log_events(task.id) == []


@pytest.mark.django_db
@pytest.mark.parametrize("status", [S.FAILED, S.CANCELLED])
def test_requeue_resets_retries_and_outcome(status):
    # given a task that failed for good after three retries
    task = make_task(
        status,
        attempt=4,
        retries=3,
        error="gone",
        failure_class="retries_exhausted",
        result={"partial": True},
        cancel_requested=True,
        finished_at=timezone.now(),
        payload={"x": 1},
    )
    now = timezone.now()

    # when it is requeued by hand
    requeued = state.requeue(task.id, by="alice", now=now)

    # then it waits again from retry 0, keeping its payload and its fencing token
    assert requeued is not None
    row = Task.objects.get(id=task.id)
    assert row.status == S.PENDING
    assert row.retries == 0
    assert row.attempt == 4
    assert (row.error, row.failure_class, row.result) == ("", "", None)
    assert row.cancel_requested is False
    assert row.finished_at is None and row.lease_expires_at is None
    assert row.next_attempt_at == now and row.dispatched_at == now
    assert row.payload == {"x": 1}
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.message) == ("requeued", "manual retry by alice")
    assert "payload_edited" not in log.data


@pytest.mark.django_db
def test_requeue_with_payload_replaces_it():
    task = make_task(S.FAILED, payload={"x": 1})

    requeued = state.requeue(task.id, by="alice", reason="redrive", payload={"x": 2})

    assert requeued is not None
    assert Task.objects.get(id=task.id).payload == {"x": 2}
    log = TaskLog.objects.get(task_id=task.id)
    assert log.data["payload_edited"] is True and log.data["reason"] == "redrive"


# --- lease expiry ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("retry", [True, False])
def test_expire_lease_still_valid_refused(retry):
    now = timezone.now()
    task = make_task(S.PROCESSING, lease_expires_at=now + timedelta(seconds=10))
    before = snapshot(task.id)

    assert state.expire_lease(task, retry=retry, delay_s=1, now=now) is None

    assert snapshot(task.id) == before
    assert log_events(task.id) == []


@pytest.mark.django_db
def test_expire_lease_with_retry_left_retrying():
    task = make_task(S.PROCESSING, retries=1, max_retries=3)
    now = timezone.now()

    expired = state.expire_lease(task, retry=True, delay_s=4, now=now)

    assert expired is not None
    row = Task.objects.get(id=task.id)
    assert row.status == S.RETRYING
    assert row.retries == 2
    assert row.next_attempt_at == now + timedelta(seconds=4)
    assert row.dispatched_at is None  # the dispatcher wakes it
    assert row.lease_expires_at is None
    assert "worker lost" in row.error
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.level) == ("lease_expired", LogLevel.WARNING)


@pytest.mark.django_db
def test_expire_lease_without_retry_failed_worker_lost():
    task = make_task(S.PROCESSING, retries=3, max_retries=3)
    now = timezone.now()

    expired = state.expire_lease(task, retry=False, delay_s=0, now=now)

    assert expired is not None
    row = Task.objects.get(id=task.id)
    assert row.status == S.FAILED
    assert row.failure_class == FailureClass.WORKER_LOST
    assert row.retries == 3
    assert row.finished_at == now and row.lease_expires_at is None
    log = TaskLog.objects.get(task_id=task.id)
    assert (log.event, log.level) == ("lease_expired", LogLevel.ERROR)
    # the holder (none here) and the rule that judged it: a lease that ran out
    assert log.data == {"failure_class": "worker_lost", "attempt": 1, "holder": None, "by": "lease"}


# --- races: two actors, one winner -------------------------------------------------------------

Op = Callable[[Task], Any]


def _claim(task: Task) -> Any:
    return state.claim(task.id, lease_s=30)


def _cancel(task: Task) -> Any:
    return state.cancel(task.id)


def _complete(task: Task) -> Any:
    return state.complete(task.id, task.attempt, {"ok": True})


def _fail(task: Task) -> Any:
    return state.fail(task.id, task.attempt, error="boom", failure_class="non_retryable")


def _cancel_running(task: Task) -> Any:
    return state.cancel_running(task.id, task.attempt)


def _schedule_retry(task: Task) -> Any:
    return state.schedule_retry(task.id, task.attempt, error="boom", delay_s=1, published=False)


def _expire_retry(task: Task) -> Any:
    return state.expire_lease(task, retry=True, delay_s=1)


def _expire_fail(task: Task) -> Any:
    return state.expire_lease(task, retry=False, delay_s=0)


def _requeue(task: Task) -> Any:
    return state.requeue(task.id)


RACES: dict[str, tuple[str, Op, Op]] = {
    "claim-vs-claim": (S.PENDING, _claim, _claim),
    "claim-vs-cancel": (S.RETRYING, _claim, _cancel),
    "complete-vs-cancel_running": (S.PROCESSING, _complete, _cancel_running),
    "complete-vs-expire_lease": (S.PROCESSING, _complete, _expire_retry),
    "fail-vs-expire_lease": (S.PROCESSING, _fail, _expire_fail),
    "schedule_retry-vs-cancel_running": (S.PROCESSING, _schedule_retry, _cancel_running),
    "requeue-vs-requeue": (S.FAILED, _requeue, _requeue),
}
ROUNDS = 3


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_exactly_one_wins():
    for _ in range(ROUNDS):
        # given a PENDING task
        task = make_task(S.PENDING)

        # when two workers, each on its own connection, claim it at the same moment
        results = run_concurrently(lambda: _claim(task), lambda: _claim(task))

        # then one gets it, with attempt 1, and the other gets nothing
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        row = Task.objects.get(id=task.id)
        assert row.status == S.PROCESSING
        assert row.attempt == winners[0].attempt == 1
        assert log_events(task.id) == ["started"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("race", list(RACES))
def test_concurrent_transitions_exactly_one_wins(race):
    status, first, second = RACES[race]
    for _ in range(ROUNDS):
        # given a task both actors may move
        task = make_task(status)

        # when both try at the same moment
        results = run_concurrently(lambda: first(task), lambda: second(task))

        # then exactly one succeeds and exactly one transition is logged
        assert sum(1 for r in results if r) == 1, results
        events = log_events(task.id)
        assert len(events) == 1
        assert Task.objects.get(id=task.id).status != status
