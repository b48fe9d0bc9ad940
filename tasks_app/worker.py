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
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from types import FrameType
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction

from queueworker import logcontext
from tasks_app import concurrent, dispatch, hooks, liveness, state
from tasks_app.backoff import backoff_delay
from tasks_app.errors import Deferred, PermanentError, RetryableError, TaskCancelled
from tasks_app.handlers.registry import registry  # the package registers the built-ins
from tasks_app.models import WAITING_STATUSES, FailureClass, Task, TaskLog

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


class OutcomeStatus(StrEnum):
    """What became of a message's task in this process (its log line and metrics name it)."""

    COMPLETED = "completed"
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEFERRED = "deferred"  # its work runs elsewhere (a data task's batches)
    SKIPPED = "skipped"  # not claimable: finished, running elsewhere, or not due
    STALE = "stale"  # the outcome was refused: the task had moved on


@dataclass(frozen=True)
class Outcome:
    status: OutcomeStatus
    detail: str = ""


def run(task_id: str, *, timeout_s: int, worker: str = "") -> Outcome:
    task = state.claim(
        task_id, lease_s=backstop_lease_s(timeout_s), worker=worker, holder=liveness.holder()
    )
    if task is None:
        return Outcome(
            OutcomeStatus.SKIPPED, "not claimable (finished, running elsewhere, or not due)"
        )
    return run_claimed(task)


def run_claimed(
    task: Task, *, completions: Completions | None = None, time_limit: bool = False
) -> Outcome:
    """Run a claimed task's handler and record its outcome.

    ``completions``: a result is buffered there and written with others (a task of a
    workflow is still finished on its own, with its coordinator). ``time_limit``: the handler
    runs under its own ``timeout_s`` (``handler_time_limit``), for a message that runs several.
    """
    logcontext.update(type=task.type, attempt=task.attempt, workflow_run_id=task.workflow_run_id)
    if task.cancel_requested:
        _finishing(task, lambda: state.cancel_running(task.id, task.attempt))
        return Outcome(OutcomeStatus.CANCELLED, "cancel requested before start")
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
        if time_limit:
            with handler_time_limit(task.timeout_s):
                result = spec.func(TaskContext(task), task.payload)
        else:
            result = spec.func(TaskContext(task), task.payload)
    except TaskCancelled:
        return finish_cancelled(task)
    except Deferred as exc:
        # Its batches run elsewhere: this process no longer holds it; their lease bounds it.
        _durably(lambda: state.release(task.id, task.attempt))
        return Outcome(OutcomeStatus.DEFERRED, str(exc))
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
    if completions is not None:
        problem = _result_problem(result)
        if problem is not None:
            return finish_failed(task, problem, retryable=False)
        completions.add(task, result)
        return Outcome(OutcomeStatus.COMPLETED, "buffered")
    return finish_completed(task, result)


def finish_completed(task: Task, result: Any) -> Outcome:
    """Record a handler's result (also for work that finishes a deferred task)."""
    problem = _result_problem(result)
    if problem is not None:
        return finish_failed(task, problem, retryable=False)
    if _finishing(task, lambda: state.complete(task.id, task.attempt, result)):
        return Outcome(OutcomeStatus.COMPLETED)
    return Outcome(OutcomeStatus.STALE, "completion discarded: the task had moved on")


def finish_cancelled(task: Task) -> Outcome:
    if _finishing(task, lambda: state.cancel_running(task.id, task.attempt)):
        return Outcome(OutcomeStatus.CANCELLED)
    return Outcome(OutcomeStatus.STALE, "cancelled, but the task had moved on")


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
            return Outcome(OutcomeStatus.STALE, "retry discarded: the task had moved on")
        if published:
            dispatch.publish([dispatch.wakeup_for(updated, countdown=delay)])
        return Outcome(OutcomeStatus.RETRYING, f"in {delay:.3f}s")
    final_class = failure_class if retryable else FailureClass.NON_RETRYABLE
    failed = _finishing(
        task,
        lambda: (
            state.fail(task.id, task.attempt, error=error, failure_class=final_class) is not None
        ),
    )
    if not failed:
        return Outcome(OutcomeStatus.STALE, "failure discarded: the task had moved on")
    return Outcome(OutcomeStatus.FAILED, final_class)


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


def _result_problem(result: Any) -> str | None:
    """Why ``result`` cannot be stored as a task's result, or None."""
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"result is not JSON: {exc}"
    if _contains_nul(result):  # PostgreSQL's jsonb cannot store NUL characters
        return "result contains a NUL character (\\u0000)"
    return None


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_contains_nul(item) for item in value)
    return False


def _finishing(task: Task, transition: Callable[[], bool]) -> bool:
    """Apply a terminal transition; where an observer follows it (a workflow's task), let it
    decide what follows in the same transaction, so that the decision can never be lost."""
    if not hooks.observed(task):
        return _durably(transition)

    def in_transaction() -> bool:
        with transaction.atomic():
            terminal = hooks.Terminal(task)  # the observers' locks first, then the task's row
            done = transition()
            if done:
                terminal.finished(task)
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


# --- Several tasks per message ------------------------------------------------------------------
# A message may wake several tasks of one type and queue (``taskIds``). Claims and completions
# are then written many per statement, which shares a commit among them; each task is still
# fenced by its own attempt, runs under its own time limit, and is cancelled, deferred or
# retried exactly as when it comes alone.

FIRST_CLAIM = 4  # the first sub-batch: the handlers' durations are not known yet
CANCEL_REFRESH_S = 0.05  # claimed tasks waiting this long re-read their cancel flags first


class HandlerTimeLimit(SoftTimeLimitExceeded):
    """A handler ran past its own task's time limit (in a message that runs several)."""


@contextmanager
def handler_time_limit(seconds: float) -> Iterator[None]:
    """Raise ``HandlerTimeLimit`` in the block after ``seconds`` (a real-time interval timer).

    Celery's soft time limit covers a whole message; with several tasks in it, each handler
    gets its own. Only the main thread receives signals: elsewhere the block runs unbounded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise HandlerTimeLimit(f"time limit of {seconds}s exceeded")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# billiard's pool sends this to a child past a message's soft time limit.
MESSAGE_SOFT_LIMIT_SIGNAL = getattr(signal, "SIGUSR1", None)


@contextmanager
def message_soft_limit_as_wrap_up(reached: threading.Event) -> Iterator[None]:
    """Past the message's soft time limit, set ``reached`` instead of raising anywhere.

    For a message of several tasks Celery's soft limit would interrupt whatever runs, a claim
    or a write of completions included; each handler has its own limit instead, and the batch
    takes the message's as a request to stop claiming and hand the rest to a new message.
    """
    if (
        MESSAGE_SOFT_LIMIT_SIGNAL is None
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    previous = signal.signal(MESSAGE_SOFT_LIMIT_SIGNAL, lambda signum, frame: reached.set())
    try:
        yield
    finally:
        signal.signal(MESSAGE_SOFT_LIMIT_SIGNAL, previous)


class Completions:
    """Results of finished handlers waiting to be written together (``state.complete_many``).

    Written when ``max_tasks`` wait, when the oldest has waited ``max_age_s`` (checked between
    handlers and, with ``background=True``, by a thread while a handler runs, so that a slow
    handler never holds the results before it back), and at the end of the message.
    """

    def __init__(self, *, max_tasks: int, max_age_s: float) -> None:
        self.max_tasks = max_tasks
        self.max_age_s = max_age_s
        self.completed = 0
        self.stale = 0
        self.writes = 0
        self._items: list[tuple[Task, Any]] = []
        self._oldest = 0.0
        self._lock = threading.Lock()  # guards the fields above
        self._writing = threading.Lock()  # one write at a time, in the order taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(self, task: Task, result: Any) -> None:
        with self._lock:
            if not self._items:
                self._oldest = time.monotonic()
            self._items.append((task, result))

    def __len__(self) -> int:
        return len(self._items)

    def due(self) -> bool:
        with self._lock:
            return bool(self._items) and (
                len(self._items) >= self.max_tasks
                or time.monotonic() - self._oldest >= self.max_age_s
            )

    def flush(self) -> None:
        """Write what waits now; a row its guard refuses counts as stale."""
        with self._writing:
            with self._lock:
                items, self._items = self._items, []
            if not items:
                return
            try:
                done = _durably(lambda: _complete_many(items))
            except BaseException:
                with self._lock:  # not written: keep them for the next try (or the raise)
                    self._items[:0] = items
                raise
            with self._lock:
                self.writes += 1
                self.completed += len(done)
                self.stale += len(items) - len(done)
            if len(done) < len(items):
                for task, _ in items:
                    if task.id not in done:
                        logger.info("completion of task %s discarded: it had moved on", task.id)

    def start_background(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qw-completions", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.max_age_s / 2):
                if self.due():
                    self.flush()
        except BaseException as exc:  # kept for the message's own final write to raise
            self._error = exc
        finally:
            connections.close_all()  # this thread's connections

    def close(self) -> None:
        """Stop the thread and write what is left (raising if it cannot be written)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()


def _complete_many(items: Sequence[tuple[Task, Any]]) -> set[Any]:
    """Write many completions (one statement); where observers follow some of them (a run's
    steps), they decide in the same transaction, their locks taken first, for all together."""
    rows = [(task.id, task.attempt, result) for task, result in items]
    followed = [task for task, _ in items if hooks.observed(task)]
    if not followed:
        return state.complete_many(rows)
    with transaction.atomic():
        terminals = hooks.Terminals(followed)  # the observers' locks first, then the tasks'
        done = state.complete_many(rows)
        terminals.finished([task for task in followed if task.id in done])
    return done


@dataclass
class BatchReport:
    """What became of a message's tasks."""

    outcomes: Counter[str]
    claimed: int = 0
    claims: int = 0  # claim statements
    writes: int = 0  # completion statements
    republished: int = 0  # ids handed to a new message past the budget
    seconds: float = 0.0


def run_batch(
    task_ids: Sequence[str],
    *,
    timeout_s: int,
    worker: str = "",
    budget_s: float | None = None,
    claim_max: int | None = None,
    flush_tasks: int | None = None,
    flush_ms: int | None = None,
    background: bool = True,
) -> BatchReport:
    """Run the tasks of one message: claim them lazily in sub-batches, run each handler under
    its own time limit, write the completions together.

    Tasks of a type registered ``io_bound`` (HTTP_REQUEST) run up to ``QW_HTTP_CONCURRENCY``
    at a time in the process's thread pool (``_run_together``), bounded by their own handler's
    deadline; the others run one after another on this thread under ``handler_time_limit``.

    A sub-batch is sized from the handlers' durations so far, so that it ends within the
    budget. Past ``budget_s`` the ids not yet claimed are published as a new message and this
    one ends: a message never holds its consumer for long. A claimed task whose outcome is not
    written when the process dies is PROCESSING with this process as its holder, so the
    heartbeat sweep runs it again; the others are finished or still claimable.
    """
    started = time.monotonic()
    budget = settings.QW_WORKER_BATCH_BUDGET_S if budget_s is None else budget_s
    most = claim_max or settings.QW_WORKER_CLAIM_MAX
    completions = Completions(
        max_tasks=flush_tasks or settings.QW_WORKER_FLUSH_TASKS,
        max_age_s=(flush_ms or settings.QW_WORKER_FLUSH_MS) / 1000,
    )
    report = BatchReport(outcomes=Counter())
    remaining = list(dict.fromkeys(str(i) for i in task_ids))
    size = min(FIRST_CLAIM, most)
    ran = 0
    running_s = 0.0
    holder = liveness.holder()
    wrap_up = threading.Event()
    if background:
        completions.start_background()
    try:
        with message_soft_limit_as_wrap_up(wrap_up):
            while remaining:
                elapsed = time.monotonic() - started
                if report.claims and (elapsed >= budget or wrap_up.is_set()):
                    report.republished = _republish(remaining)
                    break
                if ran:  # as many as should end within the budget left, at most twice as many
                    per_task = max(running_s / ran, 1e-4)
                    size = max(1, min(most, 2 * size, int((budget - elapsed) / per_task)))
                chunk, remaining = remaining[:size], remaining[size:]
                # Each may wait for those before it in the sub-batch: the backstop covers all.
                lease_s = backstop_lease_s(timeout_s) + timeout_s * (len(chunk) - 1)
                tasks = state.claim_many(chunk, lease_s=lease_s, worker=worker, holder=holder)
                report.claims += 1
                report.claimed += len(tasks)
                if len(tasks) < len(chunk):
                    report.outcomes["skipped"] += len(chunk) - len(tasks)
                order = {task_id: index for index, task_id in enumerate(chunk)}
                tasks.sort(key=lambda t: order.get(str(t.id), 0))
                together, alone = _split_io_bound(tasks)
                if together:
                    now = time.monotonic()
                    _run_together(together, completions, report)
                    running_s += time.monotonic() - now  # the wall time: they overlapped
                    ran += len(together)
                    # The next sub-batch keeps every thread busy (the budget still caps it):
                    # each sub-batch ends when its slowest task does.
                    size = max(size, concurrent.limit())
                checked = time.monotonic()
                for index, task in enumerate(alone):
                    now = time.monotonic()
                    if now - checked >= CANCEL_REFRESH_S:
                        _refresh_cancels(alone[index:])
                        checked = now
                    with logcontext.bind(task_id=str(task.id)):
                        outcome = run_claimed(task, completions=completions, time_limit=True)
                    running_s += time.monotonic() - now
                    ran += 1
                    _count(report, outcome, completions)
    finally:
        completions.close()
    if completions._error is not None:
        logger.warning("a background write of completions failed: %s", completions._error)
    buffered = report.outcomes.pop("buffered", 0)
    if buffered:
        if completions.completed:
            report.outcomes["completed"] += completions.completed
        if completions.stale:
            report.outcomes["stale"] += completions.stale
    report.writes = completions.writes
    report.seconds = time.monotonic() - started
    return report


def _count(report: BatchReport, outcome: Outcome, completions: Completions) -> None:
    """Count an outcome (a buffered completion once written) and write what is due."""
    report.outcomes[outcome.status if outcome.detail != "buffered" else "buffered"] += 1
    if completions.due():
        completions.flush()


def _split_io_bound(tasks: list[Task]) -> tuple[list[Task], list[Task]]:
    """The tasks to run together (their type is registered ``io_bound`` and the process runs
    more than one at a time, ``QW_HTTP_CONCURRENCY``) and those to run one after another."""
    if concurrent.limit() <= 1:
        return [], tasks
    together: list[Task] = []
    alone: list[Task] = []
    for task in tasks:
        spec = registry.get(task.type)
        (together if spec is not None and spec.io_bound else alone).append(task)
    return together, alone


def _run_together(tasks: list[Task], completions: Completions, report: BatchReport) -> None:
    """Run claimed I/O-bound tasks at most ``QW_HTTP_CONCURRENCY`` at a time in the process's
    pool (``tasks_app.concurrent``), counting each outcome on this thread as it finishes.

    Each task is what ``run_claimed`` makes of it alone: fenced by its own attempt, its
    completion buffered in ``completions`` (whose ``add`` takes its lock), its log fields bound
    in its own context. Its handler runs without the SIGALRM limit, which cannot reach a pool
    thread: an ``io_bound`` handler bounds its own waits by the task's ``timeout_s``. Cancels are
    read again for the tasks still waiting for a thread, as between handlers run one by one.
    """
    checked = time.monotonic()

    def before_start(waiting: Sequence[Task]) -> None:
        nonlocal checked
        now = time.monotonic()
        if now - checked >= CANCEL_REFRESH_S:
            _refresh_cancels(waiting)
            checked = now

    def start(task: Task) -> Callable[[], Outcome]:
        def call() -> Outcome:
            with logcontext.bind(task_id=str(task.id)):
                return run_claimed(task, completions=completions)

        return concurrent.in_task_thread(call)

    concurrent.run_bounded(
        tasks,
        start,
        on_done=lambda task, outcome: _count(report, outcome, completions),
        most=concurrent.limit(),
        pool=concurrent.executor(),
        before_start=before_start,
    )


def _refresh_cancels(tasks: Sequence[Task]) -> None:
    """Claimed tasks still waiting to run see a cancel requested since their claim."""
    waiting = {task.id: task for task in tasks if not task.cancel_requested}
    if not waiting:
        return
    flagged = Task.objects.filter(id__in=list(waiting), cancel_requested=True).values_list(
        "id", flat=True
    )
    for task_id in flagged:
        waiting[task_id].cancel_requested = True


def _republish(task_ids: Sequence[str]) -> int:
    """Publish wake-ups for the ids this message will not claim (those still waiting)."""
    waiting = Task.objects.filter(id__in=list(task_ids), status__in=WAITING_STATUSES)
    wakeups = [dispatch.wakeup_for(task) for task in waiting]
    dispatch.publish(wakeups)
    return len(wakeups)
