"""Writes on tasks: create (single and bulk), cancel, retry. Views call these, nothing else."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Model
from django.utils import timezone

from queueworker import logcontext
from queueworker.errors import Conflict, InvalidTransition
from tasks_app import dispatch, hooks, state
from tasks_app.models import Task, TaskLog, TaskStatus
from tasks_app.paths import json_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """A validated create request (see ``tasks_app.api.serializers.TaskCreateInput``)."""

    type: str
    payload: Any
    max_retries: int
    priority: int
    timeout_s: int
    scheduled_at: datetime | None = None
    delay_ms: int | None = None
    parent_id: Any = None
    retry_backoff_s: float | None = None
    retry_backoff_max_s: float | None = None
    retry_jitter: bool = True
    idempotency_key: str | None = None
    request_hash: str = ""
    workflow_run_id: Any = None
    step: str | None = None


class TaskInvalid(Exception):
    """A create request the gate refused.

    ``problems`` lists ``(json_path, message)`` pairs for callers that report flat lines;
    ``detail`` keeps the nested shape the API answers with, so that every 400 stays as it was.
    """

    def __init__(self, detail: Any, *, path_prefix: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.problems: list[tuple[str, str]] = list(_flatten(detail, path_prefix))


def _flatten(detail: Any, prefix: str) -> Any:
    if isinstance(detail, dict):
        for key, value in detail.items():
            # DRF keys a list's errors by index ("3"): shown as an index.
            part = int(key) if isinstance(key, str) and key.isdigit() else key
            yield from _flatten(value, json_path([part], prefix))
    elif isinstance(detail, list):
        for item in detail:
            yield from _flatten(item, prefix)
    else:
        yield prefix, str(detail)


def task_validate(data: Any, *, owner: User | None, path_prefix: str = "") -> TaskSpec:
    """The one gate every create path passes: the API (single and bulk), a schedule's fire,
    a redrive that edits a payload. It checks the type, the payload against the type's schema
    and its own rules (against ``owner`` and the timeout), the bounds of retries, timeouts,
    delays and priority, and the parent; see ``docs/architecture.md`` ("Creating a task").

    Raises ``TaskInvalid`` whose ``detail`` is the API's 400 body for these fields and whose
    ``problems`` name each field under ``path_prefix``.
    """
    from tasks_app.api.create_input import TaskCreateRules

    body = TaskCreateRules(data=data, context={"owner": owner})
    if not body.is_valid():
        raise TaskInvalid(body.errors, path_prefix=path_prefix)
    return build_spec(body.validated_data)


def build_spec(
    data: dict[str, Any], *, idempotency_key: str | None = None, request_hash: str = ""
) -> TaskSpec:
    return TaskSpec(
        type=data["type"],
        payload=data.get("payload", {}),
        max_retries=data.get("max_retries", settings.QW_DEFAULT_MAX_RETRIES),
        priority=data.get("priority", 0),
        timeout_s=data.get("timeout_s", settings.QW_DEFAULT_TIMEOUT_S),
        scheduled_at=data.get("scheduled_at"),
        delay_ms=data.get("delay_ms"),
        parent_id=data.get("parent"),
        retry_backoff_s=data.get("retry_backoff_s"),
        retry_backoff_max_s=data.get("retry_backoff_max_s"),
        retry_jitter=data.get("retry_jitter", True),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )


def canonical_hash(body: dict[str, Any]) -> str:
    """sha256 of the create body as canonical JSON, without the idempotency key itself."""
    material = {k: v for k, v in body.items() if k != "idempotency_key"}
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


def _build(spec: TaskSpec, owner: User, now: datetime) -> Task:
    due = now
    if spec.scheduled_at is not None:
        due = max(now, spec.scheduled_at)
    elif spec.delay_ms:
        due = now + timedelta(milliseconds=spec.delay_ms)
    immediate = due <= now
    return Task(
        owner=owner,
        type=spec.type,
        payload=spec.payload,
        priority=spec.priority,
        queue=settings.QW_TYPE_ROUTES.get(spec.type, settings.CELERY_TASK_DEFAULT_QUEUE),
        max_retries=spec.max_retries,
        timeout_s=spec.timeout_s,
        scheduled_at=spec.scheduled_at,
        next_attempt_at=due,
        # Delayed work waits in the database; the dispatcher publishes it when due.
        dispatched_at=now if immediate else None,
        parent_id=spec.parent_id,
        workflow_run_id=spec.workflow_run_id,
        step=spec.step,
        retry_backoff_s=spec.retry_backoff_s,
        retry_backoff_max_s=spec.retry_backoff_max_s,
        retry_jitter=spec.retry_jitter,
        idempotency_key=spec.idempotency_key,
        request_hash=spec.request_hash,
        created_at=now,
    )


def _created_log(task: Task, by: str) -> TaskLog:
    delayed = task.dispatched_at is None
    message = f"created by {by}" + (
        f", due at {task.next_attempt_at:%Y-%m-%dT%H:%M:%S.%fZ}" if delayed else ""
    )
    data: dict[str, Any] = {"by": by, "queue": task.queue, "priority": task.priority}
    # Kept with the task: a message the dispatcher or the sweep republishes carries none.
    request_id = logcontext.request_id()
    if request_id is not None:
        data["request_id"] = request_id
    return TaskLog(task=task, event="created", message=message, data=data)


def task_create(*, owner: User, spec: TaskSpec) -> tuple[Task, bool]:
    """Create one task; with an idempotency key, return the earlier task instead (created=False).

    Raises ``Conflict`` when the key was used with a different body within its TTL.
    """
    now = timezone.now()
    if spec.idempotency_key:
        earlier = _earlier_with_key(owner, spec, now)
        if earlier is not None:
            return earlier, False
    task = _build(spec, owner, now)
    log = _created_log(task, owner.get_username())
    try:
        if not _insert_with_log(task, log):
            with transaction.atomic():
                task.save(force_insert=True)
                log.save(force_insert=True)
        if task.dispatched_at is not None:
            dispatch.publish_on_commit([dispatch.wakeup_for(task)])
    except IntegrityError:
        if not spec.idempotency_key:
            raise
        # Two requests with the same key raced; the other one inserted first.
        earlier = _earlier_with_key(owner, spec, now)
        if earlier is None:
            raise
        return earlier, False
    return task, True


def _insert_with_log(task: Task, log: TaskLog) -> bool:
    """Insert ``task`` and its ``created`` log row in one statement, committed by itself, on
    PostgreSQL outside a transaction; False where that does not apply (the caller then saves
    both in a transaction). One statement is one round trip and one commit instead of three
    round trips and a commit: under a busy database, each round trip is what a create waits on.
    """
    alias = router.db_for_write(Task)
    connection = connections[alias]
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return False
    quote = connection.ops.quote_name
    task_fields = _insertable(Task)
    log_fields = [f for f in _insertable(TaskLog) if f.name != "task"]
    task_values = [f.get_db_prep_save(f.pre_save(task, True), connection) for f in task_fields]
    log.task_id = task.id
    log_values = [f.get_db_prep_save(f.pre_save(log, True), connection) for f in log_fields]
    # Names from the models, values bound as parameters.
    statement = (
        f"WITH t AS (INSERT INTO {quote(Task._meta.db_table)} "  # noqa: S608
        f"({', '.join(quote(str(f.column)) for f in task_fields)}) "
        f"VALUES ({', '.join(['%s'] * len(task_fields))}) RETURNING {quote('id')}) "
        f"INSERT INTO {quote(TaskLog._meta.db_table)} ({quote('task_id')}, "
        f"{', '.join(quote(str(f.column)) for f in log_fields)}) "
        f"SELECT t.{quote('id')}, {', '.join(['%s'] * len(log_fields))} FROM t"
    )
    with connection.cursor() as cursor:
        cursor.execute(statement, [*task_values, *log_values])
    for obj in (task, log):
        obj._state.adding = False
        obj._state.db = alias
    return True


def _insertable(model: type[Model]) -> list[Any]:
    """The concrete fields an INSERT names: all but a key the database numbers itself."""
    return [
        f
        for f in model._meta.concrete_fields
        if not (f.primary_key and getattr(f, "db_returning", False))
    ]


def _earlier_with_key(owner: User, spec: TaskSpec, now: datetime) -> Task | None:
    earlier = Task.objects.filter(owner=owner, idempotency_key=spec.idempotency_key).first()
    if earlier is None:
        return None
    if earlier.created_at < now - timedelta(hours=settings.QW_IDEMPOTENCY_TTL_HOURS):
        # The key has expired: release it so that it can name a new task.
        Task.objects.filter(pk=earlier.pk, idempotency_key=spec.idempotency_key).update(
            idempotency_key=None
        )
        return None
    if earlier.request_hash != spec.request_hash:
        raise Conflict(
            {
                "idempotency_key": [
                    f"This key was already used with a different request body (task {earlier.id})."
                ]
            }
        )
    return earlier


def task_bulk_create(
    *, owner: User, specs: Sequence[TaskSpec], by: str | None = None
) -> list[Task]:
    """Create all tasks in one transaction (all or none), then publish them in one batch.

    On PostgreSQL the task rows and their ``created`` log rows are written with ``COPY``:
    one statement each, where an ``INSERT`` of a thousand rows cost more in building its
    SQL than in running it.
    """
    now = timezone.now()
    tasks = [_build(spec, owner, now) for spec in specs]
    by = by or owner.get_username()
    logs = [_created_log(t, by) for t in tasks]
    # No savepoint when nested (the coordinator): an error undoes the enclosing decision too.
    with transaction.atomic(savepoint=False):
        insert_rows(Task, tasks)
        insert_rows(TaskLog, logs)
        dispatch.publish_on_commit(
            [dispatch.wakeup_for(t) for t in tasks if t.dispatched_at is not None]
        )
    return tasks


def insert_rows(model: type[Model], objs: Sequence[Model]) -> None:
    """Insert ``objs`` (new rows; an auto-increment key is left to the database and not read
    back) with one ``COPY`` on PostgreSQL, ``bulk_create`` elsewhere."""
    if not objs:
        return
    alias = router.db_for_write(model)
    connection = connections[alias]
    if connection.vendor != "postgresql":
        model._default_manager.using(alias).bulk_create(objs, batch_size=1000)
        return
    meta = model._meta
    fields = _insertable(model)
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields if f.column)
    statement = f"COPY {quote(meta.db_table)} ({columns}) FROM STDIN"
    with connection.cursor() as cursor, cursor.cursor.copy(statement) as copy:
        for obj in objs:
            copy.write_row([f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields])
    for obj in objs:
        obj._state.adding = False
        obj._state.db = alias


@dataclass(frozen=True)
class CancelResult:
    task: Task
    requested: bool  # True: the task is running and will stop at its next check


def task_cancel(*, task: Task, by: str) -> CancelResult:
    with transaction.atomic():
        terminal = hooks.Terminal(task)  # the observers' locks first, then the task's row
        cancelled = state.cancel(task.id, by=by)
        if cancelled is not None:
            terminal.finished(cancelled)
    if cancelled is not None:
        return CancelResult(cancelled, requested=False)
    if state.request_cancel(task.id, by=by):
        return CancelResult(Task.objects.get(pk=task.pk), requested=True)
    current = Task.objects.get(pk=task.pk)
    if current.status == TaskStatus.PROCESSING and current.cancel_requested:
        return CancelResult(current, requested=True)
    raise InvalidTransition({"detail": f"Cannot cancel a task that is {current.status}."})


def task_retry(*, task: Task, by: str, reason: str = "manual retry", payload: Any = None) -> Task:
    """FAILED/CANCELLED → PENDING with retries from 0, published after commit."""
    with transaction.atomic():
        requeued = state.requeue(task.id, by=by, reason=reason, payload=payload)
        if requeued is None:
            current = Task.objects.get(pk=task.pk)
            raise InvalidTransition({"detail": f"Cannot retry a task that is {current.status}."})
        dispatch.publish_on_commit([dispatch.wakeup_for(requeued)])
    return requeued


def dead_letter_redrive(*, tasks: Sequence[Task], by: str, payload: Any = None) -> list[Task]:
    """Send dead-lettered (FAILED) tasks back to PENDING; one batch publish after commit."""
    requeued: list[Task] = []
    with transaction.atomic():
        for task in tasks:
            updated = state.requeue(task.id, by=by, reason="redrive", payload=payload)
            if updated is not None:
                requeued.append(updated)
        dispatch.publish_on_commit([dispatch.wakeup_for(t) for t in requeued])
    return requeued
