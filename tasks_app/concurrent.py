"""Run the I/O-bound tasks of a message several at a time, in one bounded thread pool per process.

A handler registered with ``io_bound=True`` (HTTP_REQUEST) spends its time waiting on the
network. Run one after another, a message of a hundred of them keeps its worker process idle
between replies; run together, the waits overlap and the process's CPU goes to the claims and
writes instead. ``tasks_app.worker.run_batch`` hands the claimed tasks of such a type to
``run_bounded``, which keeps at most ``QW_HTTP_CONCURRENCY`` of them running in this process's
pool and gives each outcome back on the message's own thread, in the order they finish.

What stays true per task, whatever thread runs it:

- its log context: each call runs in a copy of the submitting thread's ``contextvars``
  context (``request_id`` and the rest), to which the worker binds the task's own fields; a
  copy per call, so that no task sees another's fields;
- its database connection: Django keeps one per thread; a pool thread reuses its own across
  tasks and checks it (``close_old_connections``: broken or past ``CONN_MAX_AGE`` → closed,
  reopened at the next query) at most every ``CONNECTION_CHECK_S``, as a worker's own thread
  does between messages, instead of paying a health check for every task;
- its time limit: signals reach only the main thread, so the SIGALRM limit
  (``worker.handler_time_limit``) cannot interrupt a pool thread. An I/O-bound handler must
  bound itself: HTTP_REQUEST's transport waits at most the smaller of the payload's
  ``timeout_s`` and the time left of the task's own ``timeout_s`` for every connect and read,
  and ends the exchange at that deadline (``tasks_app.http.client``). Past it the backstop
  lease and, under prefork, Celery's hard limit of the message still apply.

The pool is made lazily in the process that uses it, so a prefork child never inherits its
parent's threads; it is shared by every message that process runs at the same time (``-P
threads``), which bounds the process's threads and connections as a whole.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from django.conf import settings
from django.db import close_old_connections, connections

T = TypeVar("T")
R = TypeVar("R")

THREAD_NAME = "qw-io"
# A pool thread checks its database connection at most this often (between tasks).
CONNECTION_CHECK_S = 1.0

_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)
_local = threading.local()


def limit() -> int:
    """How many I/O-bound tasks a process runs at once (``QW_HTTP_CONCURRENCY``)."""
    return int(settings.QW_HTTP_CONCURRENCY)


def executor() -> ThreadPoolExecutor:
    """This process's pool of ``limit()`` threads, made at first use (again after a fork)."""
    global _pool
    pid = os.getpid()
    with _lock:
        if _pool is None or _pool[0] != pid:
            size = limit()
            _pool = (
                pid,
                size,
                ThreadPoolExecutor(max_workers=size, thread_name_prefix=THREAD_NAME),
            )
        return _pool[2]


def shutdown() -> None:
    """Close the database connections of every thread of this process's pool and stop it.

    A process's end closes them anyway; a process that goes on (a test session, whose
    database is dropped at its end) must not leave them open.
    """
    global _pool
    with _lock:
        current, _pool = _pool, None
    if current is None or current[0] != os.getpid():
        return
    _, size, pool = current
    barrier = threading.Barrier(size)  # one call per thread: each waits for all the others

    def close() -> None:
        connections.close_all()
        barrier.wait(timeout=10)

    for future in [pool.submit(close) for _ in range(size)]:
        future.result()
    pool.shutdown(wait=True)


def in_task_thread(call: Callable[[], R]) -> Callable[[], R]:
    """``call`` made ready for a pool thread: in a copy of the caller's log context, with the
    thread's database connection checked first when its last check is old."""
    context = contextvars.copy_context()

    def run() -> R:
        now = time.monotonic()
        if now - getattr(_local, "checked", float("-inf")) >= CONNECTION_CHECK_S:
            close_old_connections()
            _local.checked = now
        return context.run(call)

    return run


def run_bounded(
    items: Sequence[T],
    run: Callable[[T], Callable[[], R]],
    *,
    on_done: Callable[[T, R], None],
    most: int,
    pool: Executor,
    before_start: Callable[[Sequence[T]], None] | None = None,
) -> None:
    """Run ``run(item)()`` for every item in ``pool``, at most ``most`` at once.

    On the calling thread, as each finishes: ``on_done(item, result)``, in the order they
    finish; and before items are started, ``before_start(items not started yet)`` (the worker
    reads cancels there, so that a task cancelled while it waited for a thread is seen before
    it starts). Items start in their order. If a call raises, no further item starts, those
    running are waited for (their outcomes still go to ``on_done``) and the first error is
    raised: the caller sees it as it would from a loop that ran them one after another.
    """
    if most < 1:
        raise ValueError(f"most must be at least 1, got {most}")
    pending: list[T] = list(items)
    running: dict[Future[R], T] = {}
    error: BaseException | None = None
    try:
        while pending or running:
            if pending and error is None and len(running) < most:
                if before_start is not None:
                    before_start(pending)
                while pending and len(running) < most:
                    item = pending.pop(0)
                    running[pool.submit(run(item))] = item
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in _in_submission_order(done, running):
                item = running.pop(future)
                exc = future.exception()
                if exc is not None:
                    error = error or exc
                    continue
                on_done(item, future.result())
            if error is not None:
                pending.clear()
    except BaseException:
        # The caller's own code raised (on_done, before_start) or the wait was interrupted:
        # what runs is left to finish on its own; nothing more starts.
        for future in running:
            future.cancel()
        raise
    if error is not None:
        raise error


def _in_submission_order(done: set[Future[R]], running: dict[Future[R], T]) -> list[Future[R]]:
    return [future for future in running if future in done]
