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
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tasks_app import dispatch
from tasks_app import services as task_services
from tasks_app.models import Task, TaskLog, TaskStatus
from workflows_app import compensation, refs
from workflows_app import definition as definitions
from workflows_app.models import FINISHED_RUN_STATUSES, RunStatus, WorkflowRun, WorkflowVersion
from workflows_app.runs import (
    COMPENSATION_TYPE,
    DECISION_FIELDS,
    PendingSteps,
    context,
    create_tasks,
    fail_unstarted,
    finish,
    insert_tasks,
    pending_steps,
    run_tasks,
    step_tasks,
)

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _graph(version_id: int) -> definitions.Graph:
    """The validated graph of a stored version (versions never change, so it is cached)."""
    version = WorkflowVersion.objects.get(pk=version_id)
    return definitions.validate(version.definition)


def graph_for(run: WorkflowRun) -> definitions.Graph:
    return _graph(run.version_id)


def graph_for_version(version: WorkflowVersion) -> definitions.Graph:
    return _graph(version.pk)


def lock_run(run_id: Any) -> WorkflowRun:
    """Take the run's row lock before touching any of its task rows, and return the run.

    Everything that changes a run's tasks and then decides (a worker recording an outcome,
    the lease sweep, a cancel, a retry) locks the run row first and the task rows after, so
    two of them can never wait on each other.
    """
    return WorkflowRun.objects.select_for_update().select_related("owner").get(pk=run_id)


def locked_run(run_id: Any) -> tuple[WorkflowRun, list[Task]]:
    run = lock_run(run_id)
    return run, run_tasks(run)


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
    batch = pending_steps.get()
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


# --- many outcomes at once ------------------------------------------------------------------


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
    batch = PendingSteps()
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
        token = pending_steps.set(batch)
        try:
            for run_id in sorted(by_run, key=str):
                decide(locked[run_id], current[run_id])
            pending, batch.items = batch.items, []
            created = insert_tasks(pending)
            batch.wakeups.extend(
                dispatch.wakeup_for(t) for t in created if t.dispatched_at is not None
            )
        finally:
            pending_steps.reset(token)
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
