"""``state.claim_many`` and ``state.complete_many``: one statement for many tasks, each row
still guarded by its own status and attempt."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from tasks_app import state
from tasks_app.models import Task, TaskLog, TaskStatus
from tests.unit._helpers import log_events, make_task, run_concurrently

S = TaskStatus
pytestmark = pytest.mark.django_db


def test_claim_many_claims_only_the_claimable_ones():
    # given tasks in every waiting and non-waiting state, one not due, and an unknown id
    claimable = [make_task(S.PENDING), make_task(S.RETRYING, attempt=1, retries=1)]
    later = timezone.now() + timedelta(minutes=5)
    refused = [
        make_task(S.PROCESSING),
        make_task(S.COMPLETED),
        make_task(S.CANCELLED),
        make_task(S.FAILED),
        make_task(S.RETRYING, attempt=1, next_attempt_at=later),
    ]
    before = {t.id: (t.status, t.attempt) for t in refused}
    holder = uuid.uuid4()

    # when one claim_many is given all of them
    claimed = state.claim_many(
        [t.id for t in claimable + refused] + [uuid.uuid4()],
        lease_s=60,
        worker="w1",
        holder=holder,
    )

    # then only the waiting, due ones are PROCESSING, each with its own next attempt
    assert {t.id: t.attempt for t in claimed} == {claimable[0].id: 1, claimable[1].id: 2}
    for task in claimed:
        row = Task.objects.get(id=task.id)
        assert row.status == S.PROCESSING and row.holder == holder
        assert row.lease_expires_at > timezone.now() + timedelta(seconds=50)
        assert row.started_at is not None
        log = TaskLog.objects.get(task_id=task.id)
        assert (log.event, log.data) == ("started", {"worker": "w1", "attempt": row.attempt})
    for task in refused:
        row = Task.objects.get(id=task.id)
        assert (row.status, row.attempt) == before[task.id]
        assert log_events(task.id) == []


def test_claim_many_of_nothing_claims_nothing():
    assert state.claim_many([], lease_s=60) == []


def test_claim_many_keeps_the_first_started_at():
    first = timezone.now() - timedelta(hours=1)
    task = make_task(S.RETRYING, attempt=1, retries=1, started_at=first)

    (claimed,) = state.claim_many([task.id], lease_s=60)

    assert claimed.started_at == first


def test_complete_many_completes_each_row_its_guard_accepts():
    # given claimed tasks, one re-claimed since (a newer attempt), one cancelled meanwhile
    ok = [make_task(S.PROCESSING), make_task(S.PROCESSING)]
    reclaimed = make_task(S.PROCESSING, attempt=2)
    cancelled = make_task(S.CANCELLED, attempt=1)
    results = [
        (ok[0].id, 1, {"n": 1}),
        (ok[1].id, 1, None),
        (reclaimed.id, 1, {"late": True}),
        (cancelled.id, 1, {"late": True}),
        (uuid.uuid4(), 1, {}),
    ]

    # when their completions are written together
    done = state.complete_many(results)

    # then the stale ones are refused and untouched; the others completed and logged once
    assert done == {ok[0].id, ok[1].id}
    first, second = (Task.objects.get(id=t.id) for t in ok)
    assert (first.status, first.result) == (S.COMPLETED, {"n": 1})
    assert (second.status, second.result) == (S.COMPLETED, None)
    assert first.finished_at is not None and first.lease_expires_at is None
    assert log_events(ok[0].id) == ["completed"]
    assert TaskLog.objects.get(task_id=ok[0].id).data == {"attempt": 1}
    row = Task.objects.get(id=reclaimed.id)
    assert (row.status, row.attempt, row.result) == (S.PROCESSING, 2, None)
    assert Task.objects.get(id=cancelled.id).status == S.CANCELLED
    assert log_events(reclaimed.id) == log_events(cancelled.id) == []


def test_complete_many_twice_completes_once():
    task = make_task(S.PROCESSING)

    assert state.complete_many([(task.id, 1, {"a": 1})]) == {task.id}
    assert state.complete_many([(task.id, 1, {"a": 2})]) == set()

    assert Task.objects.get(id=task.id).result == {"a": 1}
    assert log_events(task.id) == ["completed"]


@pytest.mark.django_db(transaction=True)
def test_concurrent_claim_many_over_overlapping_ids_claims_each_task_once():
    for _ in range(3):
        # given 40 waiting tasks, and two workers whose messages share half of them
        tasks = [make_task(S.PENDING) for _ in range(40)]
        ids = [t.id for t in tasks]
        first, second = ids[:30], list(reversed(ids[10:]))

        # when both claim at the same moment
        results = run_concurrently(
            lambda: state.claim_many(first, lease_s=60),
            lambda: state.claim_many(second, lease_s=60),
        )

        # then every task is claimed by exactly one of them, once
        claimed = [t.id for result in results for t in result]
        assert sorted(claimed) == sorted(ids)
        assert all(t.attempt == 1 for result in results for t in result)
        assert TaskLog.objects.filter(task_id__in=ids, event="started").count() == 40
