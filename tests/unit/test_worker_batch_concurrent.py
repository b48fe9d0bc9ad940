"""The batch runner with a handler registered ``io_bound``: its tasks run several at a time in
the process's pool (``tasks_app.concurrent``), each still claimed, fenced, cancelled and counted
as alone. On the real database, committed (pool threads have connections of their own)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from queueworker import logcontext
from tasks_app import concurrent, state, worker
from tasks_app.errors import RetryableError
from tasks_app.handlers import registry
from tasks_app.models import Task, TaskStatus
from tests.unit._helpers import log_events, make_task

S = TaskStatus
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _pool(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    settings.QW_ETA_MAX_SECONDS = 60
    settings.QW_HTTP_CONCURRENCY = 8
    monkeypatch.setattr(concurrent, "_pool", None)
    yield
    concurrent.shutdown()  # the pool threads' connections, before the test database goes


@pytest.fixture
def io_type() -> Iterator[Callable[..., str]]:
    names: list[str] = []

    def register(func: Callable[[Any, Any], Any], *, io_bound: bool = True) -> str:
        name = f"TEST_{uuid.uuid4().hex[:12].upper()}"
        registry.register(name, schema={"type": "object"}, io_bound=io_bound)(func)
        names.append(name)
        return name

    yield register
    for name in names:
        registry._specs.pop(name, None)


class Seen:
    """What each handler call saw: its thread and its log context."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, tuple[str, dict[str, Any]]] = {}

    def record(self, ctx: Any) -> None:
        with self.lock:
            self.calls[str(ctx.task_id)] = (
                threading.current_thread().name,
                dict(logcontext.current()),
            )


def _batch(tasks: list[Task], **options: Any) -> worker.BatchReport:
    options.setdefault("background", False)
    with logcontext.bind(task_id=str(tasks[0].id), request_id="req-batch"):
        return worker.run_batch([str(t.id) for t in tasks], timeout_s=10, worker="w1", **options)


def test_io_bound_tasks_run_together_each_completed_once_with_its_own_log_fields(
    io_type, published
):
    # given 16 tasks of an io-bound type whose handler waits 0.2 s
    seen = Seen()

    def handler(ctx: Any, payload: Any) -> Any:
        seen.record(ctx)
        time.sleep(0.2)
        return {"n": payload["n"]}

    kind = io_type(handler)
    tasks = [make_task(type=kind, payload={"n": i}) for i in range(16)]

    # when one message runs them, 8 at a time
    started = time.monotonic()
    report = _batch(tasks)
    elapsed = time.monotonic() - started

    # then each completed once with its own result, written together
    assert report.outcomes == {"completed": 16}
    assert report.claimed == 16
    for i, task in enumerate(tasks):
        row = Task.objects.get(id=task.id)
        assert (row.status, row.attempt, row.result) == (S.COMPLETED, 1, {"n": i})
        assert log_events(task.id) == ["started", "completed"]
    # in the pool's threads, each handler seeing its own task's fields and the message's request
    for task in tasks:
        thread, fields = seen.calls[str(task.id)]
        assert thread.startswith(concurrent.THREAD_NAME)
        assert fields["task_id"] == str(task.id)
        assert fields["type"] == kind and fields["attempt"] == 1
        assert fields["request_id"] == "req-batch"
    # and overlapping: sub-batches of 4, 8 and 4 take three rounds, not 16 × 0.2 s
    assert elapsed < 1.6


def test_retries_and_failures_in_the_pool_are_recorded_and_counted(io_type, published):
    # given an io-bound type whose handler completes, asks for a retry or fails per payload
    def handler(ctx: Any, payload: Any) -> Any:
        if payload.get("retry"):
            raise RetryableError("try later")
        if payload.get("bug"):
            raise KeyError("bug")
        return {}

    kind = io_type(handler)
    ok = [make_task(type=kind, payload={}) for _ in range(3)]
    retry = make_task(type=kind, payload={"retry": True}, max_retries=3)
    bug = make_task(type=kind, payload={"bug": True})

    # when one message runs them
    report = _batch([*ok, retry, bug], background=True)

    # then each outcome is written and counted as if they had run one by one
    assert report.outcomes == {"completed": 3, "retrying": 1, "failed": 1}
    assert Task.objects.get(id=retry.id).status == S.RETRYING
    assert Task.objects.get(id=bug.id).status == S.FAILED
    assert [len(w) for w in published] == [1]  # the retry's wake-up


def test_a_cancel_requested_while_a_task_waits_for_a_thread_cancels_it_unstarted(
    io_type, published, settings
):
    # given two threads, and a first task that requests a cancel of the third one, then waits
    settings.QW_HTTP_CONCURRENCY = 2
    ran: list[str] = []
    lock = threading.Lock()

    def handler(ctx: Any, payload: Any) -> Any:
        with lock:
            ran.append(str(ctx.task_id))
        if payload.get("cancel"):
            assert state.request_cancel(payload["cancel"], by="test")
            time.sleep(worker.CANCEL_REFRESH_S * 2)
        else:
            time.sleep(worker.CANCEL_REFRESH_S * 3)
        return {}

    kind = io_type(handler)
    third = make_task(type=kind, payload={})
    first = make_task(type=kind, payload={"cancel": str(third.id)})
    second = make_task(type=kind, payload={})

    # when one message runs them two at a time: the third waits for a thread
    report = _batch([first, second, third])

    # then the third was cancelled without its handler running
    assert str(third.id) not in ran
    assert report.outcomes == {"completed": 2, "cancelled": 1}
    assert Task.objects.get(id=third.id).status == S.CANCELLED
    assert log_events(third.id) == ["started", "cancel_requested", "cancelled"]


def test_types_not_io_bound_and_a_concurrency_of_one_run_on_the_messages_thread(
    io_type, published, settings
):
    # given a type that is not io-bound, and an io-bound one with QW_HTTP_CONCURRENCY=1
    seen = Seen()

    def handler(ctx: Any, payload: Any) -> Any:
        seen.record(ctx)
        return {}

    plain = [make_task(type=io_type(handler, io_bound=False), payload={}) for _ in range(3)]
    io = [make_task(type=io_type(handler), payload={}) for _ in range(3)]

    # when each runs as one message, the io-bound one with a concurrency of 1
    assert _batch(plain).outcomes == {"completed": 3}
    settings.QW_HTTP_CONCURRENCY = 1
    assert _batch(io).outcomes == {"completed": 3}

    # then every handler ran on this thread (under its own SIGALRM limit)
    here = threading.current_thread().name
    assert {thread for thread, _ in seen.calls.values()} == {here}
    assert concurrent._pool is None  # no pool was made


def test_the_budget_still_republishes_ids_not_claimed(io_type, published):
    # given 12 io-bound tasks of 0.1 s and a budget that the first sub-batch uses up
    def handler(ctx: Any, payload: Any) -> Any:
        time.sleep(0.1)
        return {}

    kind = io_type(handler)
    tasks = [make_task(type=kind, payload={}) for _ in range(12)]

    # when one message runs them
    report = _batch(tasks, budget_s=0.05)

    # then the first sub-batch ran and the ids not claimed went to a new message, still waiting
    assert report.claimed == worker.FIRST_CLAIM
    assert report.outcomes == {"completed": worker.FIRST_CLAIM}
    assert report.republished == 12 - worker.FIRST_CLAIM
    assert sum(len(w) for w in published) == 12 - worker.FIRST_CLAIM
    rest = [t.id for t in tasks[worker.FIRST_CLAIM :]]
    assert Task.objects.filter(id__in=rest, status=S.PENDING).count() == len(rest)
