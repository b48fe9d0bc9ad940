"""The workflow coordinator: decides what happens next from persisted state (docs/workflows.md).

It is called in the transaction that records a step's outcome (the worker pipeline, the lease
sweep, a cancel), locks the run row, and reads the run's tasks: so a next step, a join, or a
compensation is decided once, whatever order or how many times completions arrive. Each
(run, step) has at most one task and one compensation (unique constraints), and tasks are
published only after the deciding transaction commits. It never enqueues anything itself:
it creates tasks through the task service, which publishes on commit.

1. A step COMPLETED: every step not started yet whose predecessors have all COMPLETED starts
   (fan-out, and fan-in once the last branch completes); when every step has COMPLETED, the
   run is COMPLETED. A step whose ``$ref`` cannot be resolved within its bounds
   (``workflows_app.refs``) gets its task failed at once, and counts as a failed step.
2. A step FAILED or CANCELLED while the run runs: the run turns COMPENSATING and the
   compensation planner (``compensation.advance``) takes over.
3. Anything that finishes while the run compensates: the planner advances.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.utils import timezone

from tasks_app import dispatch, state
from tasks_app import services as task_services
from tasks_app.models import FailureClass, Task, TaskLog, TaskStatus
from workflows_app import compensation, refs
from workflows_app import definition as definitions
from workflows_app.models import FINISHED_RUN_STATUSES, RunStatus, WorkflowRun, WorkflowVersion

logger = logging.getLogger(__name__)

COMPENSATION_TYPE = "COMPENSATION"


@functools.lru_cache(maxsize=256)
def _graph(version_id: int) -> definitions.Graph:
    """The validated graph of a stored version (versions never change, so it is cached)."""
    version = WorkflowVersion.objects.get(pk=version_id)
    return definitions.validate(version.definition)


def graph_for(run: WorkflowRun) -> definitions.Graph:
    return _graph(run.version_id)


def graph_for_version(version: WorkflowVersion) -> definitions.Graph:
    return _graph(version.pk)


def context(run: WorkflowRun, tasks: list[Task]) -> dict[str, Any]:
    """What a ``$ref`` reads: ``{input, steps: {<name>: {result, status, task}}}``."""
    return {
        "input": run.input,
        "steps": {
            t.step: {"result": t.result, "status": t.status, "task": str(t.id)}
            for t in tasks
            if t.type != COMPENSATION_TYPE and t.step
        },
    }


#: The start of the error of a task that failed before it ran (its ``$ref`` did not resolve).
COULD_NOT_START = "could not start: "


def fail_unstarted(task: Task, reason: str) -> None:
    """Fail a task just created whose payload could not be built (``refs.RefError``).

    It keeps its declared payload, ``$ref`` and all, and fails for good without running: the
    coordinator then treats it as any failed step (or compensation).
    """
    claimed = state.claim(task.id, lease_s=settings.QW_LEASE_SECONDS)
    assert claimed is not None  # created in this transaction, not yet published
    state.fail(
        task.id,
        claimed.attempt,
        error=f"{COULD_NOT_START}{reason}"[:4000],
        failure_class=FailureClass.NON_RETRYABLE,
    )


def lock_run(run_id: Any) -> WorkflowRun:
    """Take the run's row lock before touching any of its task rows, and return the run.

    Everything that changes a run's tasks and then decides (a worker recording an outcome,
    the lease sweep, a cancel, a retry) locks the run row first and the task rows after, so
    two of them can never wait on each other.
    """
    return WorkflowRun.objects.select_for_update().select_related("owner").get(pk=run_id)


#: The columns a decision reads of a run's tasks: not the payloads (possibly large, never
#: needed) nor the bookkeeping of attempts; any other field is loaded if a caller touches it.
DECISION_FIELDS = (
    "id",
    "type",
    "status",
    "step",
    "result",
    "error",
    "parent_id",
    "workflow_run_id",
    "created_at",
    "finished_at",
)


def run_tasks(run: WorkflowRun) -> list[Task]:
    """The run's tasks, with the columns a decision reads (``DECISION_FIELDS``)."""
    return list(Task.objects.filter(workflow_run=run).only(*DECISION_FIELDS).order_by("created_at"))


def locked_run(run_id: Any) -> tuple[WorkflowRun, list[Task]]:
    run = lock_run(run_id)
    return run, run_tasks(run)


def step_tasks(tasks: list[Task]) -> dict[str, Task]:
    return {t.step: t for t in tasks if t.type != COMPENSATION_TYPE and t.step}


def task_finished(task: Task, *, run: WorkflowRun | None = None) -> None:
    """A task of a run reached a terminal status: decide what follows (in the caller's
    transaction, which must be the one that recorded the outcome). ``run``: the run, already
    locked by ``lock_run`` in this transaction."""
    if task.workflow_run_id is None:
        return
    # No savepoint: any error must undo the outcome it decides about, with it.
    with transaction.atomic(savepoint=False):
        if run is None:
            run = lock_run(task.workflow_run_id)
        tasks = run_tasks(run)
        finished = next((t for t in tasks if t.pk == task.pk), None)
        if (
            finished is not None
            and finished.type == COMPENSATION_TYPE
            and finished.status == TaskStatus.COMPLETED
            and finished.parent_id is not None
        ):
            # Record the undo against the task it undoes (once: one terminal transition).
            _compensated_log(finished, run.id).save(force_insert=True)
        decide(run, tasks)


def decide(run: WorkflowRun, tasks: list[Task]) -> None:
    """Move ``run`` (locked) forward from what its tasks say now; safe to call any number of
    times (the recovery sweep calls it for runs that look stuck)."""
    if run.status in FINISHED_RUN_STATUSES:
        return
    graph = graph_for(run)
    steps = step_tasks(tasks)
    if run.status == RunStatus.RUNNING:
        broken = [
            t for t in steps.values() if t.status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
        ]
        if broken:
            first = min(broken, key=lambda t: t.finished_at or timezone.now())
            verb = "failed" if first.status == TaskStatus.FAILED else "was cancelled"
            detail = f": {first.error}" if first.error else ""
            run.status = RunStatus.COMPENSATING
            run.error = f"step {first.step} {verb}{detail}"[:4000]
            run.save(update_fields=["status", "error", "updated_at"])
        else:
            _advance(run, graph, tasks, steps)
            return
    compensation.advance(run, graph, tasks)


def _advance(
    run: WorkflowRun, graph: definitions.Graph, tasks: list[Task], steps: dict[str, Task]
) -> None:
    done = {name for name, t in steps.items() if t.status == TaskStatus.COMPLETED}
    if len(done) == len(graph.steps):
        finish(run, RunStatus.COMPLETED)
        return
    ready = [
        name
        for name in graph.order
        if name not in steps and all(p in done for p in graph.predecessors[name])
    ]
    if ready:
        start_steps(run, graph, ready, context(run, tasks))


def start_steps(
    run: WorkflowRun, graph: definitions.Graph, names: list[str], ctx: dict[str, Any]
) -> list[Task]:
    """Create the tasks of ``names`` (published after commit), ``$ref`` resolved now.

    A step whose ``$ref`` cannot be resolved (an error, too much work, a payload over
    ``QW_MAX_PAYLOAD_BYTES``) gets its task all the same, failed with the reason, and the run
    moves on from that failure at once (the saga compensates).
    """
    specs = []
    unstartable: dict[str, str] = {}
    for name in names:
        step = graph.steps[name]
        try:
            payload = refs.resolve(step.payload, ctx, path=f"steps.{name}.payload")
        except refs.RefError as exc:
            payload = step.payload
            unstartable[name] = str(exc)
        specs.append(
            task_services.TaskSpec(
                type=step.type,
                payload=payload,
                max_retries=step.max_retries
                if step.max_retries is not None
                else settings.QW_DEFAULT_MAX_RETRIES,
                priority=step.priority or 0,
                timeout_s=step.timeout_s or settings.QW_DEFAULT_TIMEOUT_S,
                workflow_run_id=run.id,
                step=name,
            )
        )
    by = f"workflow run {run.id}"
    batch = _batch.get()
    if batch is not None and not unstartable:
        batch.items.extend((run.owner, spec, by) for spec in specs)
        return []  # created with the rest of the batch, in one statement
    tasks = create_tasks(run.owner, specs, by=by)
    if unstartable:
        for task in tasks:
            if task.step in unstartable:
                fail_unstarted(task, unstartable[task.step])
        decide(run, run_tasks(run))
    return tasks


def finish(run: WorkflowRun, status: str, error: str | None = None) -> None:
    run.status = status
    run.finished_at = timezone.now()
    fields = ["status", "finished_at", "updated_at"]
    if error is not None:
        run.error = error[:4000]
        fields.append("error")
    run.save(update_fields=fields)
    logger.info("workflow run %s %s", run.id, status, extra={"workflow_run_id": str(run.id)})


# --- creating the tasks a decision starts: one statement ------------------------------------

_TASK_FIELDS = [f for f in Task._meta.concrete_fields]
_LOG_COLUMNS = ("task_id", "level", "event", "message", "data", "created_at")


def _insert_sql(rows: int) -> str:
    qn = connection.ops.quote_name
    task_table = qn(Task._meta.db_table)
    log_table = qn(TaskLog._meta.db_table)
    columns = ", ".join(qn(str(f.column)) for f in _TASK_FIELDS)
    task_row = "(" + ", ".join(["%s"] * len(_TASK_FIELDS)) + ")"
    log_row = "(" + ", ".join(["%s"] * len(_LOG_COLUMNS)) + ")"
    log_columns = ", ".join(qn(c) for c in _LOG_COLUMNS)
    # Quoted model identifiers only; every value is a parameter.
    return (
        f"WITH t AS (INSERT INTO {task_table} ({columns}) VALUES "  # noqa: S608
        f"{', '.join([task_row] * rows)} RETURNING 1), "
        f"l AS (INSERT INTO {log_table} ({log_columns}) VALUES "
        f"{', '.join([log_row] * rows)} RETURNING 1) "
        f"SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM l)"
    )


def insert_tasks(items: Sequence[tuple[User, task_services.TaskSpec, str]]) -> list[Task]:
    """Insert the tasks of ``items`` (owner, spec, by) and their ``created`` log rows.

    On PostgreSQL one statement (a data-modifying CTE) writes both; elsewhere two bulk
    INSERTs. The rows are those ``task_services.task_bulk_create`` writes; nothing is
    published: the caller publishes the wake-ups of the tasks with ``dispatched_at`` after
    commit. A (run, step) that already has its task is a unique violation, as there.
    """
    if not items:
        return []
    now = timezone.now()
    tasks = [task_services._build(spec, owner, now) for owner, spec, _ in items]
    logs = [task_services._created_log(t, by) for t, (_, _, by) in zip(tasks, items, strict=True)]
    if connection.vendor != "postgresql":
        Task.objects.bulk_create(tasks)
        TaskLog.objects.bulk_create(logs)
        return tasks
    params: list[Any] = []
    for task in tasks:
        for f in _TASK_FIELDS:
            params.append(f.get_db_prep_save(f.pre_save(task, True), connection))
        task._state.adding = False
        task._state.db = connection.alias
    for log in logs:
        params += [log.task_id, log.level, log.event, log.message, json.dumps(log.data), now]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(len(tasks)), params)
    return tasks


def create_tasks(owner: User, specs: Sequence[task_services.TaskSpec], *, by: str) -> list[Task]:
    """Insert ``specs`` (one statement) and publish their wake-ups after commit."""
    tasks = insert_tasks([(owner, spec, by) for spec in specs])
    wakeups = [dispatch.wakeup_for(t) for t in tasks if t.dispatched_at is not None]
    batch = _batch.get()
    if batch is not None:
        batch.wakeups.extend(wakeups)  # the batch's caller publishes them after commit
    else:
        dispatch.publish_on_commit(wakeups)
    return tasks


# --- many outcomes at once ------------------------------------------------------------------


@dataclass
class _Batch:
    items: list[tuple[User, task_services.TaskSpec, str]] = field(default_factory=list)
    wakeups: list[dispatch.Wakeup] = field(default_factory=list)


_batch: ContextVar[_Batch | None] = ContextVar("workflow_batch", default=None)


def lock_runs(run_ids: Iterable[Any]) -> dict[Any, WorkflowRun]:
    """Lock the rows of ``run_ids`` in id order (one statement) and return them by id.

    The one lock order of every path: a run's row before any of its task rows, and several
    runs in id order, so a batch never waits on a single completion that waits on it.
    """
    ids = {run_id for run_id in run_ids if run_id is not None}
    if not ids:
        return {}
    locked = (
        WorkflowRun.objects.select_for_update(of=("self",))
        .select_related("owner")
        .filter(pk__in=ids)
        .order_by("pk")
    )
    return {run.pk: run for run in locked}


def tasks_finished(
    tasks: Sequence[Task], *, runs: dict[Any, WorkflowRun] | None = None
) -> list[dispatch.Wakeup]:
    """Decide what follows many finished tasks of many runs, in the caller's transaction.

    Contract:

    - Call it in the transaction that recorded the outcomes of ``tasks`` (each a task that
      reached a terminal status just now; tasks of no run are ignored). The runs' rows must
      be locked *before* those outcomes were recorded: take them with ``lock_runs`` (id
      order) and pass them as ``runs``; a run missing from ``runs`` is locked here.
    - Each run is decided once, from its tasks as they are after the whole batch, however
      many of its tasks are in it (two branches of a join finishing together start the join
      once). Decisions are those of ``task_finished``, one task at a time: the same steps,
      joins, compensations and run statuses, and the same ``compensated`` log rows.
    - The steps the batch starts are created together, tasks and log rows in one statement.
      Their wake-ups are returned, *not* published: publish them after commit (e.g.
      ``dispatch.publish_on_commit``). Rare paths (a compensation, a step whose ``$ref``
      cannot be resolved) create their task at once, their wake-ups returned all the same.
    - Any error propagates and must undo the whole transaction, outcomes with it.
    """
    by_run: dict[Any, list[Task]] = {}
    for task in tasks:
        if task.workflow_run_id is not None:
            by_run.setdefault(task.workflow_run_id, []).append(task)
    if not by_run:
        return []
    batch = _Batch()
    with transaction.atomic(savepoint=False):
        locked = dict(runs or {})
        missing = [run_id for run_id in by_run if run_id not in locked]
        if missing:
            locked.update(lock_runs(missing))
        current: dict[Any, list[Task]] = {run_id: [] for run_id in by_run}
        rows = Task.objects.filter(workflow_run_id__in=list(by_run)).only(*DECISION_FIELDS)
        for row in rows.order_by("created_at"):
            current[row.workflow_run_id].append(row)
        finished_ids = {t.pk for t in tasks}
        undone = [
            _compensated_log(t, run_id)
            for run_id, run_tasks_ in current.items()
            for t in run_tasks_
            if t.pk in finished_ids
            and t.type == COMPENSATION_TYPE
            and t.status == TaskStatus.COMPLETED
            and t.parent_id is not None
        ]
        if undone:
            TaskLog.objects.bulk_create(undone)
        token = _batch.set(batch)
        try:
            for run_id in sorted(by_run, key=str):
                decide(locked[run_id], current[run_id])
            pending, batch.items = batch.items, []
            created = insert_tasks(pending)
            batch.wakeups.extend(
                dispatch.wakeup_for(t) for t in created if t.dispatched_at is not None
            )
        finally:
            _batch.reset(token)
    return batch.wakeups


def _compensated_log(finished: Task, run_id: Any) -> TaskLog:
    assert finished.parent_id is not None  # a compensation names the task it undoes
    return TaskLog(
        task_id=finished.parent_id,
        event="compensated",
        message=f"undone by compensation task {finished.id}",
        data={"compensation": str(finished.id), "workflow_run": str(run_id)},
    )


class RunObserver:
    """Follows the terminal transitions of a run's tasks for the engine (``tasks_app.hooks``):
    the run's row is locked before the task's, and the run decided in the outcome's
    transaction."""

    def observes(self, task: Task) -> bool:
        return task.workflow_run_id is not None

    def lock(self, task: Task) -> WorkflowRun:
        return lock_run(task.workflow_run_id)

    def finished(self, task: Task, held: WorkflowRun) -> None:
        task_finished(task, run=held)

    def lock_many(self, tasks: Sequence[Task]) -> dict[Any, WorkflowRun]:
        return lock_runs(task.workflow_run_id for task in tasks)

    def finished_many(self, tasks: Sequence[Task], held: dict[Any, WorkflowRun]) -> None:
        dispatch.publish_on_commit(tasks_finished(tasks, runs=held))
