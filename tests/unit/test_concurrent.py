"""The bounded runner of I/O-bound tasks (``tasks_app.concurrent``), with plain functions in a
real thread pool: how many run at once, where outcomes are reported, what an error stops, and
the log context each call sees."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from queueworker import logcontext
from tasks_app import concurrent


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


class Gauge:
    """Counts calls running at once, and the most seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


def test_every_item_runs_once_never_more_than_most_at_a_time(pool):
    # given 12 items that each take 20 ms, at most 3 at a time in a pool of 8 threads
    gauge = Gauge()
    reported: list[tuple[int, int, str]] = []

    def run(item: int) -> Callable[[], int]:
        def call() -> int:
            with gauge:
                time.sleep(0.02)
            return item * 10

        return call

    # when they run
    started = time.monotonic()
    concurrent.run_bounded(
        list(range(12)),
        run,
        on_done=lambda item, result: reported.append(
            (item, result, threading.current_thread().name)
        ),
        most=3,
        pool=pool,
    )
    elapsed = time.monotonic() - started

    # then each was reported once with its result, on the calling thread
    assert sorted((item, result) for item, result, _ in reported) == [
        (i, i * 10) for i in range(12)
    ]
    assert {name for _, _, name in reported} == {threading.current_thread().name}
    # and no more than 3 ran at once, but they overlapped (12 × 20 ms one by one is 240 ms)
    assert gauge.most == 3
    assert elapsed < 0.2


def test_items_start_in_order_and_before_start_sees_only_those_waiting(pool):
    # given 5 items, 2 at a time
    started: list[int] = []
    lock = threading.Lock()
    seen: list[list[int]] = []

    def run(item: int) -> Callable[[], None]:
        def call() -> None:
            with lock:
                started.append(item)
            time.sleep(0.01)

        return call

    # when they run
    concurrent.run_bounded(
        [1, 2, 3, 4, 5],
        run,
        on_done=lambda item, result: None,
        most=2,
        pool=pool,
        before_start=lambda waiting: seen.append(list(waiting)),
    )

    # then the first round saw all five waiting, each later round only those not yet started
    assert seen[0] == [1, 2, 3, 4, 5]
    for before, after in itertools.pairwise(seen):
        assert len(after) < len(before) and before[-len(after) :] == after
    assert sorted(started) == [1, 2, 3, 4, 5]
    assert started[:2] in ([1, 2], [2, 1])


def test_a_flag_set_by_before_start_is_seen_by_the_item_when_it_starts(pool):
    # given items that wait for a thread while the first one runs, and a flag set between rounds
    cancelled: set[int] = set()
    ran: list[tuple[int, bool]] = []

    def before_start(waiting: Sequence[int]) -> None:
        if 3 in waiting:
            cancelled.add(3)  # as the worker marks a cancel read again before start

    def run(item: int) -> Callable[[], None]:
        def call() -> None:
            ran.append((item, item in cancelled))
            time.sleep(0.01)

        return call

    # when they run one at a time
    concurrent.run_bounded(
        [1, 2, 3], run, on_done=lambda i, r: None, most=1, pool=pool, before_start=before_start
    )

    # then item 3 started already knowing it was flagged
    assert (3, True) in ran


def test_an_error_stops_new_starts_waits_for_those_running_and_is_raised(pool):
    # given 6 items, 2 at a time: item 1 fails at once, item 0 is still running then
    release = threading.Event()
    started: list[int] = []
    reported: list[int] = []

    def run(item: int) -> Callable[[], int]:
        def call() -> int:
            started.append(item)
            if item == 1:
                raise RuntimeError("boom")
            release.wait(5)
            return item

        return call

    threading.Timer(0.1, release.set).start()

    # when they run
    with pytest.raises(RuntimeError, match="boom"):
        concurrent.run_bounded(
            list(range(6)),
            run,
            on_done=lambda item, result: reported.append(item),
            most=2,
            pool=pool,
        )

    # then nothing started after the error, and the one running still had its outcome reported
    assert sorted(started) == [0, 1]
    assert reported == [0]


def test_most_must_be_positive(pool):
    # given / when / then a bound below one is refused before anything runs
    with pytest.raises(ValueError, match="at least 1"):
        concurrent.run_bounded(
            [1], lambda i: lambda: i, on_done=lambda i, r: None, most=0, pool=pool
        )


def test_each_call_gets_its_own_copy_of_the_callers_log_context(pool):
    # given a message's log context and calls that bind their own task fields
    seen: dict[str, dict[str, object]] = {}
    lock = threading.Lock()

    def call_for(task_id: str) -> Callable[[], None]:
        def call() -> None:
            with logcontext.bind(task_id=task_id):
                logcontext.update(type="HTTP_REQUEST", attempt=int(task_id[-1]))
                time.sleep(0.01)
                with lock:
                    seen[task_id] = dict(logcontext.current())

        return concurrent.in_task_thread(call)

    with logcontext.bind(task_id="message", request_id="req-1"):
        calls = [call_for(f"t{i}") for i in range(1, 5)]
        # when they run at the same time in pool threads
        for future in [pool.submit(c) for c in calls]:
            future.result()
        outer = dict(logcontext.current())

    # then each saw the message's request id with its own task fields only
    for i in range(1, 5):
        assert seen[f"t{i}"] == {
            "task_id": f"t{i}",
            "request_id": "req-1",
            "type": "HTTP_REQUEST",
            "attempt": i,
        }
    # and nothing leaked back into the caller's context
    assert outer == {"task_id": "message", "request_id": "req-1"}


def test_the_process_pool_is_made_once_with_the_configured_size(settings, monkeypatch):
    # given no pool yet in this process, and a concurrency of 5
    monkeypatch.setattr(concurrent, "_pool", None)
    settings.QW_HTTP_CONCURRENCY = 5

    # when it is asked for twice
    first = concurrent.executor()
    second = concurrent.executor()

    # then it is the same pool, of 5 threads, until it is shut down
    assert first is second
    assert first._max_workers == 5
    assert concurrent.limit() == 5
    concurrent.shutdown()
    assert concurrent._pool is None
    with pytest.raises(RuntimeError):
        first.submit(print)


def test_the_pool_is_made_again_in_another_process(settings, monkeypatch):
    # given a pool recorded for another process id (a prefork parent's)
    settings.QW_HTTP_CONCURRENCY = 2
    inherited = ThreadPoolExecutor(max_workers=2)
    monkeypatch.setattr(concurrent, "_pool", (-1, 2, inherited))

    # when this process asks for its pool
    made = concurrent.executor()

    # then it gets a new one of its own, and the parent's is left alone
    try:
        assert made is not inherited
    finally:
        concurrent.shutdown()
        inherited.shutdown(wait=True)
