"""A run's persisted state, as the coordinator and the saga's planner read and change it: its
tasks (the columns a decision reads), the ``$ref`` context they make, its end, and creating the
tasks a decision starts (one statement, published after commit).

``workflows_app.coordinator`` decides what follows an outcome and ``workflows_app.compensation``
plans the undo; both build on this module, which imports neither.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from tasks_app import dispatch, state
from tasks_app import services as task_services
from tasks_app.models import FailureClass, Task, TaskLog
from tasks_app.task_types import TaskType
from workflows_app.models import WorkflowRun

logger = logging.getLogger(__name__)

COMPENSATION_TYPE = TaskType.COMPENSATION


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


def step_tasks(tasks: list[Task]) -> dict[str, Task]:
    return {t.step: t for t in tasks if t.type != COMPENSATION_TYPE and t.step}


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
    batch = pending_steps.get()
    if batch is not None:
        batch.wakeups.extend(wakeups)  # the batch's caller publishes them after commit
    else:
        dispatch.publish_on_commit(wakeups)
    return tasks


@dataclass
class PendingSteps:
    items: list[tuple[User, task_services.TaskSpec, str]] = field(default_factory=list)
    wakeups: list[dispatch.Wakeup] = field(default_factory=list)


pending_steps: ContextVar[PendingSteps | None] = ContextVar("workflow_batch", default=None)
