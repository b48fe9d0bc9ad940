"""The saga's undo (docs/workflows.md): plan and run the compensations of a failed or cancelled run.

Called by the coordinator with the run locked, any number of times; each call moves the
undo one step further from what the run's tasks say now:

1. No new step starts: waiting step tasks are cancelled. Running ones are allowed to finish
   (for a cancelled run they are asked to stop at their next check); the undo waits for them.
2. The COMPLETED steps that declare a compensation are undone in reverse order of
   completion — a successor always completes after its predecessor, so this respects the
   graph — one COMPENSATION task at a time, ``parent`` = the task it undoes, with its own
   retries. A ``$ref`` in the action sees the compensated step's result.
3. When every compensation has COMPLETED the run is COMPENSATED (CANCELLED if it was
   cancelled). A compensation that fails for good ends the run FAILED naming it (``retry``
   re-runs it and continues); a failed run with nothing to undo ends FAILED (``retry``
   resumes from the failed step).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from tasks_app import services as task_services
from tasks_app import state
from tasks_app.models import WAITING_STATUSES, Task, TaskStatus
from workflows_app import definition as definitions
from workflows_app import refs, runs
from workflows_app.models import RunStatus, WorkflowRun


def advance(run: WorkflowRun, graph: definitions.Graph, tasks: list[Task]) -> None:
    steps = runs.step_tasks(tasks)
    by = f"workflow run {run.id}"
    for name, task in list(steps.items()):
        if task.status in WAITING_STATUSES:
            cancelled = state.cancel(task.id, by=by)
            if cancelled is not None:
                steps[name] = cancelled
        elif task.status == TaskStatus.PROCESSING and run.cancel_requested:
            state.request_cancel(task.id, by=by)
    if any(t.status == TaskStatus.PROCESSING for t in steps.values()):
        return  # running steps finish first; their outcome calls the coordinator again
    compensations = {t.step: t for t in tasks if t.type == runs.COMPENSATION_TYPE}
    plan = undo_order(graph, steps)
    for task in plan:
        undo = compensations.get(task.step)
        if undo is None:
            start_compensation(run, graph, task, runs.context(run, tasks))
            return
        if undo.status == TaskStatus.COMPLETED:
            continue
        if undo.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            runs.finish(
                run,
                RunStatus.FAILED,
                f"compensation of step {task.step} failed (task {undo.id}): {undo.error}",
            )
            return
        return  # that compensation is still waiting or running
    if run.cancel_requested:
        runs.finish(run, RunStatus.CANCELLED)
    elif plan:
        runs.finish(run, RunStatus.COMPENSATED)
    else:
        runs.finish(
            run, RunStatus.FAILED, f"{run.error}; no completed step declared a compensation"
        )


def undo_order(graph: definitions.Graph, steps: dict[str, Task]) -> list[Task]:
    """COMPLETED steps that declare a compensation, most recently completed first."""
    done = [
        t
        for name, t in steps.items()
        if t.status == TaskStatus.COMPLETED and graph.steps[name].compensation is not None
    ]
    return sorted(done, key=lambda t: (t.finished_at, t.created_at), reverse=True)


def start_compensation(
    run: WorkflowRun, graph: definitions.Graph, task: Task, ctx: dict[str, Any]
) -> Task:
    """Create the COMPENSATION task of ``task``'s step; one whose ``$ref`` cannot be resolved
    is created failed with the reason, and the undo moves on from that failure at once."""
    spec = graph.steps[str(task.step)].compensation
    assert spec is not None  # undo_order keeps only steps that declare one
    error = None
    try:
        undo = compensation_spec(task, spec, ctx, workflow_run_id=run.id)
    except refs.RefError as exc:
        error = str(exc)
        undo = compensation_spec(task, spec, ctx, workflow_run_id=run.id, resolve_refs=False)
    (created,) = runs.create_tasks(run.owner, [undo], by=f"workflow run {run.id}")
    if error is not None:
        runs.fail_unstarted(created, error)
        advance(run, graph, runs.run_tasks(run))
    return created


def compensation_spec(
    task: Task,
    action: dict[str, Any],
    ctx: dict[str, Any],
    *,
    workflow_run_id: Any = None,
    priority: int = 0,
    resolve_refs: bool = True,
) -> task_services.TaskSpec:
    """The COMPENSATION task that undoes ``task`` with ``action`` ({type, payload,
    max_retries?}), its ``$ref`` values resolved over ``ctx`` (``refs.RefError`` when they
    cannot be; kept as declared with ``resolve_refs=False``); ``parent`` = the undone task."""
    max_retries = action.get("max_retries")
    payload = action.get("payload", {})
    if resolve_refs:
        payload = refs.resolve(payload, ctx, path="action.payload")
    return task_services.TaskSpec(
        type=runs.COMPENSATION_TYPE,
        payload={
            "compensates": str(task.id),
            "action": {"type": action["type"], "payload": payload},
        },
        max_retries=max_retries if max_retries is not None else settings.QW_DEFAULT_MAX_RETRIES,
        priority=priority,
        timeout_s=settings.QW_DEFAULT_TIMEOUT_S,
        parent_id=task.id,
        workflow_run_id=workflow_run_id,
        step=task.step if workflow_run_id is not None else None,
    )
