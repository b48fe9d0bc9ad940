"""The batch runner (``tasks_app.worker.run_batch``) called directly, on the real database:
sub-batches of claims, completions written together, each handler's own time limit, the
budget past which the ids not claimed go to a new message."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery.exceptions import Reject
from django.db.models import F

from tasks_app import state, worker
from tasks_app.errors import RetryableError
from tasks_app.handlers import registry
from tasks_app.models import FailureClass, Task, TaskStatus
from tasks_app.tasks import MAX_TASK_IDS, _task_ids_from
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
    names: list[str] = []

    def register(func: Callable[[Any, Any], Any]) -> str:
        name = f"TEST_{uuid.uuid4().hex[:12].upper()}"
        registry.register(name, schema={"type": "object"})(func)
        names.append(name)
        return name

    yield register
    for name in names:
        registry._specs.pop(name, None)


def _batch(tasks: list[Task], **options: Any) -> worker.BatchReport:
    options.setdefault("background", False)
    return worker.run_batch([str(t.id) for t in tasks], timeout_s=10, worker="w1", **options)


def test_batch_runs_every_task_and_writes_completions_together(published):
    tasks = [make_task(type="NOOP", payload={"result": i}) for i in range(10)]

    report = _batch(tasks, flush_tasks=4)

    assert report.outcomes == {"completed": 10}
    assert report.claimed == 10
    assert report.writes == 3  # 4 + 4 + the 2 left at the end
    for i, task in enumerate(tasks):
        row = Task.objects.get(id=task.id)
        assert (row.status, row.attempt) == (S.COMPLETED, 1)
        assert row.result == {"ok": True, "attempt": 1, "result": i}
        assert log_events(task.id) == ["started", "completed"]
    assert published == []


def test_batch_claims_lazily_in_growing_sub_batches(published):
    tasks = [make_task(type="NOOP") for _ in range(40)]

    report = _batch(tasks, claim_max=16)

    # 4, 8, 16, 12: the first is small, then each at most twice the last, up to claim_max
    assert report.claims == 4
    assert report.outcomes == {"completed": 40}


def test_batch_skips_tasks_not_claimable_and_runs_the_others(published):
    done = make_task(S.COMPLETED)
    running = make_task(S.PROCESSING)
    waiting = make_task(type="NOOP")

    report = _batch([done, running, waiting])

    assert report.outcomes == {"skipped": 2, "completed": 1}
    assert Task.objects.get(id=running.id).status == S.PROCESSING


def test_batch_writes_completions_between_handlers_once_the_oldest_waited_long_enough(
    handler_type, published
):
    def slow(ctx: Any, payload: Any) -> Any:
        time.sleep(0.03)
        return {}

    tasks = [make_task(type=handler_type(slow)) for _ in range(3)]

    report = _batch(tasks, flush_ms=10, flush_tasks=100)

    # the first two once the first had waited 10 ms (after the second), the third at the end
    assert report.outcomes == {"completed": 3}
    assert report.writes == 2


@pytest.mark.django_db(transaction=True)
def test_a_slow_handler_does_not_hold_back_the_results_before_it(handler_type, published):
    # given a fast task, then a slow one that watches whether the fast one is recorded
    seen: list[str] = []

    def fast(ctx: Any, payload: Any) -> Any:
        return {}

    def slow(ctx: Any, payload: Any) -> Any:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            status = Task.objects.get(id=first.id).status
            if status == S.COMPLETED:
                break
            time.sleep(0.01)
        seen.append(status)
        return {}

    first = make_task(type=handler_type(fast))
    second = make_task(type=handler_type(slow))

    # when they run in one message with the background writer
    report = _batch([first, second], flush_ms=20, flush_tasks=100, background=True)

    # then the first was COMPLETED while the second still ran
    assert seen == [S.COMPLETED]
    assert report.outcomes == {"completed": 2}


def test_past_the_budget_the_ids_not_claimed_are_published_again(handler_type, published):
    def slow(ctx: Any, payload: Any) -> Any:
        time.sleep(0.05)
        return {}

    kind = handler_type(slow)
    tasks = [make_task(type=kind) for _ in range(7)]

    report = _batch(tasks, budget_s=0.1)

    # the first sub-batch (4) ran; the 3 left were handed to a new message, still PENDING
    assert report.outcomes == {"completed": 4}
    assert report.republished == 3
    assert sorted(w.task_id for batch in published for w in batch) == sorted(
        str(t.id) for t in tasks[4:]
    )
    assert {w.type for batch in published for w in batch} == {kind}
    assert all(Task.objects.get(id=t.id).status == S.PENDING for t in tasks[4:])


def test_the_message_soft_limit_stops_claiming_instead_of_interrupting(handler_type, published):
    # given a batch whose message reaches Celery's soft time limit during its first handler
    previous = signal.getsignal(signal.SIGUSR1)

    def handler(ctx: Any, payload: Any) -> Any:
        if payload.get("signal"):
            os.kill(os.getpid(), signal.SIGUSR1)  # what billiard's pool sends at the soft limit
            time.sleep(0.01)
        return {}

    kind = handler_type(handler)
    tasks = [make_task(type=kind, payload={"signal": True})]
    tasks += [make_task(type=kind, payload={}) for _ in range(6)]

    report = _batch(tasks)

    # then the claimed sub-batch finishes and the rest goes to a new message
    assert report.outcomes == {"completed": 4}
    assert report.republished == 3
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_each_handler_runs_under_its_own_time_limit(handler_type, published):
    def sleepy(ctx: Any, payload: Any) -> Any:
        time.sleep(payload["s"])
        return {}

    kind = handler_type(sleepy)
    slow = make_task(type=kind, payload={"s": 5}, timeout_s=1, max_retries=0)
    fast = make_task(type=kind, payload={"s": 0}, timeout_s=1)

    started = time.monotonic()
    report = _batch([slow, fast])

    assert time.monotonic() - started < 3
    assert report.outcomes == {"failed": 1, "completed": 1}
    row = Task.objects.get(id=slow.id)
    assert (row.status, row.failure_class) == (S.FAILED, FailureClass.TIMEOUT)
    assert Task.objects.get(id=fast.id).status == S.COMPLETED
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_handler_time_limit_is_disarmed_and_the_previous_handler_restored():
    previous = signal.getsignal(signal.SIGALRM)

    with worker.handler_time_limit(5):
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 5

    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is previous
    with pytest.raises(worker.HandlerTimeLimit):
        with worker.handler_time_limit(0.05):
            time.sleep(1)


def test_a_cancel_requested_after_the_claim_stops_a_task_before_it_starts(handler_type, published):
    ran: list[str] = []

    def handler(ctx: Any, payload: Any) -> Any:
        ran.append(str(ctx.task_id))
        if payload.get("cancel"):
            assert state.request_cancel(payload["cancel"], by="test")
            time.sleep(worker.CANCEL_REFRESH_S * 1.5)
        return {}

    kind = handler_type(handler)
    second = make_task(type=kind, payload={})
    first = make_task(type=kind, payload={"cancel": str(second.id)})

    report = _batch([first, second])

    assert ran == [str(first.id)]
    assert report.outcomes == {"completed": 1, "cancelled": 1}
    assert Task.objects.get(id=second.id).status == S.CANCELLED
    assert log_events(second.id) == ["started", "cancel_requested", "cancelled"]


def test_a_retry_inside_a_batch_is_scheduled_and_published_like_a_single_one(
    handler_type, published
):
    def handler(ctx: Any, payload: Any) -> Any:
        if payload.get("fail"):
            raise RetryableError("try again")
        return {}

    kind = handler_type(handler)
    failing = make_task(type=kind, payload={"fail": True}, max_retries=3)
    others = [make_task(type=kind, payload={}) for _ in range(2)]

    report = _batch([others[0], failing, others[1]])

    assert report.outcomes == {"completed": 2, "retrying": 1}
    row = Task.objects.get(id=failing.id)
    assert (row.status, row.retries) == (S.RETRYING, 1)
    assert [w.task_id for batch in published for w in batch] == [str(failing.id)]


def test_a_completion_refused_by_its_guard_is_stale(handler_type, published):
    def superseded(ctx: Any, payload: Any) -> Any:
        Task.objects.filter(id=ctx.task_id).update(attempt=F("attempt") + 1)  # re-claimed
        return {}

    task = make_task(type=handler_type(superseded))

    report = _batch([task])

    assert report.outcomes == {"stale": 1}
    assert Task.objects.get(id=task.id).status == S.PROCESSING


@pytest.mark.parametrize(
    "value",
    [
        "not a list",
        [],
        ["not-a-uuid"],
        [str(uuid.uuid4())],  # taskId is not among them
        [str(uuid.uuid4()) for _ in range(MAX_TASK_IDS + 1)],
    ],
)
def test_malformed_task_ids_refuse_the_message(value):
    with pytest.raises(Reject):
        _task_ids_from(value, str(uuid.uuid4()))


def test_task_ids_put_task_id_first_once():
    first, other = str(uuid.uuid4()), str(uuid.uuid4())

    assert _task_ids_from([other, first, other], first) == [first, other]
