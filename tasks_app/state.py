"""The task state machine: every status change is one guarded UPDATE plus its TaskLog row.

Each function applies one transition of ``tasks_app.transitions.TRANSITIONS`` as

    UPDATE task SET status = <target>, … WHERE id = %s AND status IN (<sources>)
                                              [AND attempt = %s] [AND …] RETURNING *

and writes the log row in the same transaction. A row count of zero means another actor got
there first (a duplicate message, a late worker, a concurrent cancel); the caller then does
nothing. On PostgreSQL the UPDATE and the log INSERT are one statement (a data-modifying CTE),
so a transition costs one round trip and one commit; elsewhere they run in one ``atomic`` block.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from django.db import connection, transaction
from django.db.models import Field
from django.utils import timezone

from tasks_app.models import LogLevel, Task, TaskLog, TaskStatus, WorkerHeartbeat
from tasks_app.transitions import TRANSITIONS, Transition

__all__ = [
    "LogEntry",
    "apply",
    "apply_quiet",
    "cancel",
    "cancel_running",
    "claim",
    "claim_many",
    "complete",
    "complete_many",
    "expire_lease",
    "fail",
    "release",
    "renew_lease",
    "request_cancel",
    "requeue",
    "schedule_retry",
]


@dataclass(frozen=True)
class Expr:
    """A SQL expression assigned to a column (``attempt + 1``), with its own parameters."""

    sql: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True)
class LogEntry:
    message: str = ""
    level: str = LogLevel.INFO
    data: dict[str, Any] = field(default_factory=dict)
    event: str | None = None  # defaults to the transition's event


# Every column, id and attempt first: the SQLite path writes the log row from those two.
_FIELDS = sorted(Task._meta.concrete_fields, key=lambda f: f.attname not in ("id", "attempt"))
_COLUMNS: list[str] = [str(f.column) for f in _FIELDS]
_ATTNAMES: list[str] = [f.attname for f in Task._meta.concrete_fields]
# Model.from_db takes a full row positionally in the model's field order.
_TO_MODEL_ORDER = [_FIELDS.index(f) for f in Task._meta.concrete_fields]
_converters_by_vendor: dict[str, list[tuple[int, list[Any], Any]]] = {}


def _task_from_row(row: Any) -> Task:
    """A Task from a ``RETURNING *`` row, converted as Django's compiler would convert it.

    ``Model.objects.raw`` does the same but resolves its column mapping on every call, which
    cost more than the statement itself on the worker's claim.
    """
    converters = _converters_by_vendor.get(connection.vendor)
    if converters is None:
        converters = []
        for index, field in enumerate(_FIELDS):
            column = field.get_col(Task._meta.db_table)
            found = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
            if found:
                converters.append((index, found, column))
        _converters_by_vendor[connection.vendor] = converters
    values = list(row)
    for index, functions, column in converters:
        for convert in functions:
            values[index] = convert(values[index], column, connection)
    return Task.from_db(connection.alias, _ATTNAMES, [values[i] for i in _TO_MODEL_ORDER])


_RETURNING_ALL = ", ".join(connection.ops.quote_name(c) for c in _COLUMNS)
_RETURNING_ID_ATTEMPT = ", ".join(connection.ops.quote_name(c) for c in _COLUMNS[:2])


def _field(name: str) -> Field[Any, Any]:
    return cast(Field, Task._meta.get_field(name))


def _prep(name: str, value: Any) -> Any:
    return _field(name).get_db_prep_save(value, connection)


def _update(
    task_id: Any,
    transition: Transition,
    values: dict[str, Any] | None,
    attempt: int | None,
    where: Expr | None,
) -> tuple[str, list[Any]]:
    """The guarded ``UPDATE`` (without ``RETURNING``) for one transition, and its parameters."""
    rule = TRANSITIONS[transition]
    if rule.fenced and attempt is None:
        raise ValueError(f"{transition} is fenced: pass the attempt that claimed the task")
    qn = connection.ops.quote_name
    assignments = {"status": rule.target, **(values or {})}
    sets: list[str] = []
    params: list[Any] = []
    for name, value in assignments.items():
        column = qn(str(_field(name).column))
        if isinstance(value, Expr):
            sets.append(f"{column} = {value.sql}")
            params.extend(value.params)
        else:
            sets.append(f"{column} = %s")
            params.append(_prep(name, value))
    sources = sorted(rule.sources)
    conditions = [f"{qn('id')} = %s", f"{qn('status')} IN ({', '.join(['%s'] * len(sources))})"]
    params.append(_prep("id", task_id))
    params.extend(sources)
    if rule.fenced:
        conditions.append(f"{qn('attempt')} = %s")
        params.append(attempt)
    if where is not None:
        conditions.append(f"({where.sql})")
        params.extend(where.params)
    table = qn(Task._meta.db_table)
    # Identifiers are quoted model names; every value is a parameter.
    return f"UPDATE {table} SET {', '.join(sets)} WHERE {' AND '.join(conditions)}", params  # noqa: S608


def _with_log(update: str, returning: str) -> str:
    """PostgreSQL: the UPDATE and its log INSERT as one statement (one round trip, one commit)."""
    log_table = connection.ops.quote_name(TaskLog._meta.db_table)
    return (
        f"WITH t AS ({update} RETURNING {returning}), "  # noqa: S608  # quoted identifiers only
        f"l AS (INSERT INTO {log_table} (task_id, level, event, message, data, created_at) "
        f"SELECT t.id, %s, %s, %s, %s::jsonb || jsonb_build_object('attempt', t.attempt), %s "
        f"FROM t) SELECT * FROM t"
    )


def _log_params(transition: Transition, log: LogEntry | None, now: datetime) -> list[Any]:
    log = log or LogEntry()
    return [
        log.level,
        log.event or TRANSITIONS[transition].event,
        log.message,
        json.dumps(log.data),
        now,
    ]


def _write_log(task_id: Any, attempt: int, log_params: list[Any]) -> None:
    level, event, message, data, _ = log_params
    TaskLog.objects.create(
        task_id=task_id,
        level=level,
        event=event,
        message=message,
        data={**json.loads(data), "attempt": attempt},
    )


def _execute(
    task_id: Any,
    transition: Transition,
    returning: str,
    *,
    values: dict[str, Any] | None,
    attempt: int | None,
    where: Expr | None,
    log: LogEntry | None,
    now: datetime | None,
) -> tuple[Any, ...] | None:
    """Run one guarded transition with its log row; the ``RETURNING`` row, or None if refused.

    ``returning`` must start with the id and attempt columns (the SQLite path logs with them).
    """
    now = now or timezone.now()
    update, params = _update(task_id, transition, values, attempt, where)
    log_params = _log_params(transition, log, now)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(_with_log(update, returning), [*params, *log_params])
            return cursor.fetchone()
        with transaction.atomic():
            cursor.execute(f"{update} RETURNING {returning}", params)
            row = cursor.fetchone()
            if row is not None:
                _write_log(row[0], row[1], log_params)
            return row


def apply(
    task_id: Any,
    transition: Transition,
    *,
    values: dict[str, Any] | None = None,
    attempt: int | None = None,
    where: Expr | None = None,
    log: LogEntry | None = None,
    now: datetime | None = None,
) -> Task | None:
    """Apply ``transition`` to one task if its guard holds; return the updated row or None."""
    row = _execute(
        task_id,
        transition,
        _RETURNING_ALL,
        values=values,
        attempt=attempt,
        where=where,
        log=log,
        now=now,
    )
    return _task_from_row(row) if row is not None else None


def apply_quiet(
    task_id: Any,
    transition: Transition,
    *,
    values: dict[str, Any] | None = None,
    attempt: int | None = None,
    where: Expr | None = None,
    log: LogEntry | None = None,
    now: datetime | None = None,
) -> bool:
    """``apply`` for callers that need only whether it happened (no row is read back)."""
    row = _execute(
        task_id,
        transition,
        _RETURNING_ID_ATTEMPT,
        values=values,
        attempt=attempt,
        where=where,
        log=log,
        now=now,
    )
    return row is not None


def _lease_until(seconds: float, now: datetime | None) -> Any:
    """``now + seconds``; without ``now``, on the database's clock (PostgreSQL's), so that the
    sweep, which compares with the database's clock, never depends on a worker's."""
    if now is None and connection.vendor == "postgresql":
        return Expr("statement_timestamp() + make_interval(secs => %s)", (float(seconds),))
    return (now or timezone.now()) + timedelta(seconds=seconds)


def claim(
    task_id: Any,
    *,
    lease_s: float,
    worker: str = "",
    holder: uuid.UUID | None = None,
    now: datetime | None = None,
) -> Task | None:
    """PENDING/RETRYING → PROCESSING for a task that is due; bumps the fencing token.

    ``holder``: the claiming process's heartbeat id (``tasks_app.liveness``), which proves the
    attempt alive; ``lease_s`` is the backstop for a holder that lives but never finishes.
    """
    lease_until = _lease_until(lease_s, now)
    now = now or timezone.now()
    qn = connection.ops.quote_name
    due_by = now + timedelta(seconds=1)  # a countdown's ETA may fire a moment early
    return apply(
        task_id,
        Transition.CLAIM,
        values={
            "attempt": Expr(f"{qn('attempt')} + 1"),
            "lease_expires_at": lease_until,
            "holder": holder,
            "started_at": Expr(f"COALESCE({qn('started_at')}, %s)", (_prep("started_at", now),)),
        },
        where=Expr(
            f"{qn('next_attempt_at')} IS NULL OR {qn('next_attempt_at')} <= %s",
            (_prep("next_attempt_at", due_by),),
        ),
        log=LogEntry(
            message=f"started on {worker}" if worker else "started", data={"worker": worker}
        ),
        now=now,
    )


def complete(task_id: Any, attempt: int, result: Any, *, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    return apply_quiet(
        task_id,
        Transition.COMPLETE,
        attempt=attempt,
        values={
            "result": result,
            "finished_at": now,
            "lease_expires_at": None,
            "error": "",
            "failure_class": "",
        },
        log=LogEntry(message="completed"),
        now=now,
    )


def schedule_retry(
    task_id: Any,
    attempt: int,
    *,
    error: str,
    delay_s: float,
    published: bool,
    transition: Transition = Transition.SCHEDULE_RETRY,
    now: datetime | None = None,
) -> Task | None:
    """PROCESSING → RETRYING.

    ``published``: a countdown message will wake the task; otherwise the dispatcher will.
    """
    now = now or timezone.now()
    due = now + timedelta(seconds=delay_s)
    qn = connection.ops.quote_name
    return apply(
        task_id,
        transition,
        attempt=attempt,
        values={
            "retries": Expr(f"{qn('retries')} + 1"),
            "next_attempt_at": due,
            "dispatched_at": due if published else None,
            "lease_expires_at": None,
            "error": error,
        },
        log=LogEntry(
            level=LogLevel.WARNING,
            message=f"{error} — retrying in {delay_s:.3f}s",
            data={"delay_s": round(delay_s, 3), "error": error},
        ),
        now=now,
    )


def fail(
    task_id: Any,
    attempt: int,
    *,
    error: str,
    failure_class: str,
    transition: Transition = Transition.FAIL,
    now: datetime | None = None,
) -> Task | None:
    now = now or timezone.now()
    return apply(
        task_id,
        transition,
        attempt=attempt,
        values={
            "error": error,
            "failure_class": failure_class,
            "finished_at": now,
            "lease_expires_at": None,
        },
        log=LogEntry(
            level=LogLevel.ERROR,
            message=error,
            data={"failure_class": failure_class},
        ),
        now=now,
    )


def cancel_running(task_id: Any, attempt: int, *, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    return apply_quiet(
        task_id,
        Transition.CANCEL_RUNNING,
        attempt=attempt,
        values={"finished_at": now, "lease_expires_at": None},
        log=LogEntry(message="cancelled while running"),
        now=now,
    )


def cancel(task_id: Any, *, by: str = "", now: datetime | None = None) -> Task | None:
    """PENDING/RETRYING → CANCELLED at once."""
    now = now or timezone.now()
    return apply(
        task_id,
        Transition.CANCEL,
        values={"finished_at": now, "next_attempt_at": None},
        log=LogEntry(message=f"cancelled by {by}" if by else "cancelled", data={"by": by}),
        now=now,
    )


def request_cancel(task_id: Any, *, by: str = "") -> bool:
    """Flag a PROCESSING task; its handler stops at its next check. Not a status change."""
    with transaction.atomic():
        updated = Task.objects.filter(
            id=task_id, status=TaskStatus.PROCESSING, cancel_requested=False
        ).update(cancel_requested=True)
        if updated:
            TaskLog.objects.create(
                task_id=task_id,
                event="cancel_requested",
                message=f"cancellation requested by {by}" if by else "cancellation requested",
                data={"by": by},
            )
    return bool(updated)


def requeue(
    task_id: Any,
    *,
    by: str = "",
    reason: str = "manual retry",
    payload: Any = None,
    now: datetime | None = None,
) -> Task | None:
    """FAILED/CANCELLED → PENDING, retries from 0 (manual retry, redrive)."""
    now = now or timezone.now()
    values: dict[str, Any] = {
        "retries": 0,
        "error": "",
        "failure_class": "",
        "result": None,
        "cancel_requested": False,
        "next_attempt_at": now,
        "dispatched_at": now,
        "lease_expires_at": None,
        "finished_at": None,
    }
    data: dict[str, Any] = {"by": by, "reason": reason}
    if payload is not None:
        values["payload"] = payload
        data["payload_edited"] = True
    return apply(
        task_id,
        Transition.REQUEUE,
        values=values,
        log=LogEntry(message=f"{reason} by {by}" if by else reason, data=data),
        now=now,
    )


def expire_lease(
    task: Task,
    *,
    retry: bool,
    delay_s: float,
    now: datetime | None = None,
    stale_before: datetime | None = None,
) -> Task | None:
    """PROCESSING whose worker is gone: count it as a failed attempt (``worker_lost``).

    Gone means the backstop lease ran out (``lease_expires_at < now``) or, with
    ``stale_before``, that the holder's heartbeat is older than it (or missing). The guard
    checks this again in the UPDATE, so a task whose holder just wrote is left alone.
    """
    now = now or timezone.now()
    qn = connection.ops.quote_name
    guard_sql = f"{qn('lease_expires_at')} < %s"
    guard_params: list[Any] = [_prep("lease_expires_at", now)]
    error = "worker lost: the lease expired before the task finished"
    by = "lease"
    if stale_before is not None:
        heartbeats = qn(WorkerHeartbeat._meta.db_table)
        guard_sql += (
            f" OR ({qn('holder')} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {heartbeats} h "  # noqa: S608
            f"WHERE h.{qn('id')} = {qn(Task._meta.db_table)}.{qn('holder')} "
            f"AND h.{qn('beat_at')} >= %s))"
        )
        guard_params.append(_prep("lease_expires_at", stale_before))
        if task.lease_expires_at is None or task.lease_expires_at >= now:
            error = "worker lost: its process stopped sending heartbeats"
            by = "heartbeat"
    # Which process held it, and which rule judged it: an operator (and the soak) can tell a
    # dead worker's tasks from work that outlived its lease.
    evidence = {"holder": str(task.holder) if task.holder else None, "by": by}
    lease_guard = Expr(guard_sql, tuple(guard_params))
    if retry:
        return apply(
            task.id,
            Transition.EXPIRE_LEASE_RETRY,
            attempt=task.attempt,
            where=lease_guard,
            values={
                "retries": Expr(f"{qn('retries')} + 1"),
                "next_attempt_at": now + timedelta(seconds=delay_s),
                "dispatched_at": None,
                "lease_expires_at": None,
                "error": error,
            },
            log=LogEntry(
                level=LogLevel.WARNING,
                message=f"{error}; retrying in {delay_s:.3f}s",
                data={"delay_s": round(delay_s, 3), **evidence},
            ),
            now=now,
        )
    return apply(
        task.id,
        Transition.EXPIRE_LEASE_FAIL,
        attempt=task.attempt,
        where=lease_guard,
        values={
            "error": error,
            "failure_class": "worker_lost",
            "finished_at": now,
            "lease_expires_at": None,
        },
        log=LogEntry(
            level=LogLevel.ERROR,
            message=error,
            data={"failure_class": "worker_lost", **evidence},
        ),
        now=now,
    )


def release(task_id: Any, attempt: int) -> bool:
    """A running attempt that no process holds any more (a data task waiting for its batches):
    its backstop lease, which the batches renew, alone bounds it. Not a status change."""
    return bool(
        Task.objects.filter(
            pk=task_id, status=TaskStatus.PROCESSING, attempt=attempt, holder__isnull=False
        ).update(holder=None)
    )


def renew_lease(task_id: Any, *, seconds: float, now: datetime | None = None) -> bool:
    """Push a running task's lease to ``now + seconds`` (never shorten it): work done on its
    behalf elsewhere (DATA_PROCESSING's batches) is a sign of life. Not a status change."""
    until = (now or timezone.now()) + timedelta(seconds=seconds)
    return bool(
        Task.objects.filter(
            pk=task_id, status=TaskStatus.PROCESSING, lease_expires_at__lt=until
        ).update(lease_expires_at=until)
    )


# --- Many tasks per statement (the worker's batches) -------------------------------------------
# A message may wake several tasks; claiming and completing them one statement each would cost
# the worker two commits per task. These take a list and cost one statement (one commit) for
# all: each row is still guarded by its own status and, for outcomes, its own attempt.

MAX_BATCH = 500


def _uuid_list(ids: Any) -> list[uuid.UUID]:
    return sorted({i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids})


def claim_many(
    task_ids: Any,
    *,
    lease_s: float,
    worker: str = "",
    holder: uuid.UUID | None = None,
    now: datetime | None = None,
) -> list[Task]:
    """``claim`` for every claimable task of ``task_ids``, in one statement; the claimed rows.

    Each claimed row gets its own new attempt (``attempt + 1``) and its ``started`` log row in
    the same statement. Rows are locked in id order before they are updated, so two claims
    over overlapping ids wait for each other instead of deadlocking, and each task is claimed
    once. Ids that are unknown, not due, running or finished are left alone.
    """
    ids = _uuid_list(task_ids)
    if not ids:
        return []
    if connection.vendor != "postgresql":
        claimed = (
            claim(task_id, lease_s=lease_s, worker=worker, holder=holder, now=now)
            for task_id in ids
        )
        return [task for task in claimed if task is not None]
    now = now or timezone.now()
    qn = connection.ops.quote_name
    table = qn(Task._meta.db_table)
    rule = TRANSITIONS[Transition.CLAIM]
    sources = sorted(rule.sources)
    due_by = now + timedelta(seconds=1)  # a countdown's ETA may fire a moment early
    placeholders = ", ".join(["%s"] * len(sources))
    # Identifiers are quoted model names; every value is a parameter.
    locked = (
        f"SELECT {qn('id')} FROM {table} WHERE {qn('id')} = ANY(%s::uuid[]) "  # noqa: S608
        f"AND {qn('status')} IN ({placeholders}) "
        f"AND ({qn('next_attempt_at')} IS NULL OR {qn('next_attempt_at')} <= %s) "
        f"ORDER BY {qn('id')} FOR UPDATE"
    )
    update = (
        f"UPDATE {table} SET {qn('status')} = %s, {qn('attempt')} = {qn('attempt')} + 1, "  # noqa: S608
        f"{qn('lease_expires_at')} = statement_timestamp() + make_interval(secs => %s), "
        f"{qn('holder')} = %s, {qn('started_at')} = COALESCE({qn('started_at')}, %s) "
        f"FROM c WHERE {table}.{qn('id')} = c.{qn('id')} "
        f"AND {table}.{qn('status')} IN ({placeholders})"
    )
    returning = ", ".join(f"{table}.{qn(c)}" for c in _COLUMNS)
    params: list[Any] = [
        ids,
        *sources,
        _prep("next_attempt_at", due_by),
        rule.target,
        float(lease_s),
        holder,
        _prep("started_at", now),
        *sources,
    ]
    log = LogEntry(message=f"started on {worker}" if worker else "started", data={"worker": worker})
    sql = f"WITH c AS ({locked}), " + _with_log(update, returning)[len("WITH ") :]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *_log_params(Transition.CLAIM, log, now)])
        rows = cursor.fetchall()
    return [_task_from_row(row) for row in rows]


def complete_many(
    outcomes: list[tuple[Any, int, Any]], *, now: datetime | None = None
) -> set[uuid.UUID]:
    """``complete`` for many ``(task_id, attempt, result)`` at once; the ids completed.

    One statement on PostgreSQL: an ``UPDATE … FROM unnest(…)`` guarded per row by its id, its
    attempt and PROCESSING, with each completed row's log written by the same statement. An
    id missing from the answer was refused by its guard (stale: the task had moved on).
    """
    if not outcomes:
        return set()
    now = now or timezone.now()
    if connection.vendor != "postgresql":
        done: set[uuid.UUID] = set()
        for task_id, attempt, result in outcomes:
            if complete(task_id, attempt, result, now=now):
                done.add(task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id)))
        return done
    ordered = sorted(
        (i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)), a, r) for i, a, r in outcomes
    )
    qn = connection.ops.quote_name
    table = qn(Task._meta.db_table)
    rule = TRANSITIONS[Transition.COMPLETE]
    sources = sorted(rule.sources)
    update = (
        f"UPDATE {table} SET {qn('status')} = %s, {qn('result')} = v.result::jsonb, "  # noqa: S608
        f"{qn('finished_at')} = %s, {qn('lease_expires_at')} = NULL, {qn('error')} = '', "
        f"{qn('failure_class')} = '' "
        f"FROM unnest(%s::uuid[], %s::integer[], %s::text[]) AS v(id, attempt, result) "
        f"WHERE {table}.{qn('id')} = v.id AND {table}.{qn('attempt')} = v.attempt "
        f"AND {table}.{qn('status')} IN ({', '.join(['%s'] * len(sources))})"
    )
    params: list[Any] = [
        rule.target,
        _prep("finished_at", now),
        [i for i, _, _ in ordered],
        [a for _, a, _ in ordered],
        [None if r is None else json.dumps(r) for _, _, r in ordered],  # None: SQL NULL
        *sources,
    ]
    returning = f"{table}.{qn('id')}, {table}.{qn('attempt')}"
    log = LogEntry(message="completed")
    with connection.cursor() as cursor:
        cursor.execute(
            _with_log(update, returning), [*params, *_log_params(Transition.COMPLETE, log, now)]
        )
        return {row[0] for row in cursor.fetchall()}
