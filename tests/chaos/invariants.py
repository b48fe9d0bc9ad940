"""The reliability invariants (docs/reliability.md), checked over the test's whole database.

Used after every fault and by the soak::

    found = invariants.settle_and_check(window_s=60, accepted=ids)
    report.record("worker SIGKILLed", found, injected=5, ...)
    found.assert_ok()

``settle`` waits (up to the recovery window) until no task or run is unfinished and every
queue of the session's vhost is empty; ``check`` then reads the audit trail:

- **lost**: a task accepted by the API with no row, or a task still not terminal after the
  window (``stuck`` are the PROCESSING ones among them);
- **duplicates executed** (allowed, counted): claims beyond the first that the handler did not
  ask for (a ``started`` row not preceded by a ``retry_scheduled``): a redelivery after a lost
  worker or a lost database connection;
- **duplicates completed** (must be 0): a task with more than one ``completed`` row, or whose
  status and ``completed`` rows disagree;
- **joins fired twice**: more than one step task (or compensation) for one step of one run —
  the unique constraints forbid it, the checker counts it anyway;
- **queues left**: ready messages on any queue once the rest has settled.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import connection

from tasks_app.models import TERMINAL_STATUSES, Task, TaskLog, TaskStatus
from tests.chaos import harness
from workflows_app.models import FINISHED_RUN_STATUSES, WorkflowRun

SAMPLE = 10  # ids quoted per violation
ACCEPTED_CHUNK = 10_000  # ids per statement: PostgreSQL takes at most 65,535 parameters


@dataclass
class Findings:
    tasks: int = 0
    runs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    runs_by_status: dict[str, int] = field(default_factory=dict)
    executions: int = 0
    duplicates_executed: int = 0
    redispatched: int = 0
    leases_expired: int = 0
    duplicates_completed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    joins_twice: list[str] = field(default_factory=list)
    runs_unfinished: list[str] = field(default_factory=list)
    queues: dict[str, int] = field(default_factory=dict)
    settle_s: float = 0.0

    @property
    def completed(self) -> int:
        return self.by_status.get(TaskStatus.COMPLETED, 0)

    @property
    def failed(self) -> int:
        return self.by_status.get(TaskStatus.FAILED, 0)

    @property
    def queues_left(self) -> int:
        return sum(self.queues.values())

    @property
    def violations(self) -> list[str]:
        found = []
        for name, ids in (
            ("accepted by the API but not stored", self.missing),
            ("lost (not terminal after the recovery window)", self.lost),
            ("stuck in PROCESSING", self.stuck),
            ("completed twice (or status and log disagree)", self.duplicates_completed),
            ("workflow step or join created twice", self.joins_twice),
            ("workflow runs unfinished", self.runs_unfinished),
        ):
            if ids:
                found.append(f"{len(ids)} {name}: {', '.join(ids[:SAMPLE])}")
        if self.queues_left:
            left = {q: n for q, n in self.queues.items() if n}
            found.append(f"queues did not drain: {left}")
        return found

    def assert_ok(self) -> None:
        assert not self.violations, "invariants broken:\n- " + "\n- ".join(self.violations)


def _unfinished() -> tuple[int, int]:
    tasks = Task.objects.exclude(status__in=TERMINAL_STATUSES).count()
    runs = WorkflowRun.objects.exclude(status__in=FINISHED_RUN_STATUSES).count()
    return tasks, runs


def settle(window_s: float, *, interval: float = 0.5) -> float:
    """Wait until nothing is unfinished and the queues are empty, at most ``window_s``.

    Returns the seconds it took (``window_s`` if it never settled: ``check`` says what is
    left). Queues are read once the database has settled: late duplicates still drain.
    """
    started = time.monotonic()
    deadline = started + window_s
    while time.monotonic() < deadline:
        if _unfinished() == (0, 0) and not sum(harness.queue_depths().values()):
            return round(time.monotonic() - started, 1)
        time.sleep(interval)
    return round(window_s, 1)


def _rows(sql: str, params: Iterable[object] = ()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))
        return list(cursor.fetchall())


def check(*, accepted: Iterable[str] = (), settle_s: float = 0.0) -> Findings:
    """Read the database and the queues; the ``Findings`` say what, if anything, broke."""
    task_table = connection.ops.quote_name(Task._meta.db_table)
    log_table = connection.ops.quote_name(TaskLog._meta.db_table)
    found = Findings(settle_s=settle_s)
    found.by_status = dict(_rows(f"SELECT status, count(*) FROM {task_table} GROUP BY status"))
    found.tasks = sum(found.by_status.values())
    runs = WorkflowRun.objects.values_list("status", flat=True)
    for status in runs:
        found.runs_by_status[status] = found.runs_by_status.get(status, 0) + 1
    found.runs = sum(found.runs_by_status.values())

    accepted = list(dict.fromkeys(str(a) for a in accepted))
    if accepted:
        stored: set[str] = set()
        for start in range(0, len(accepted), ACCEPTED_CHUNK):
            chunk = accepted[start : start + ACCEPTED_CHUNK]
            stored.update(
                str(pk) for pk in Task.objects.filter(pk__in=chunk).values_list("pk", flat=True)
            )
        found.missing = [a for a in accepted if a not in stored]

    not_terminal = Task.objects.exclude(status__in=TERMINAL_STATUSES)
    found.lost = [str(pk) for pk in not_terminal.values_list("pk", flat=True)]
    found.stuck = [
        str(pk)
        for pk in not_terminal.filter(status=TaskStatus.PROCESSING).values_list("pk", flat=True)
    ]
    found.runs_unfinished = [
        str(pk)
        for pk in WorkflowRun.objects.exclude(status__in=FINISHED_RUN_STATUSES).values_list(
            "pk", flat=True
        )
    ]

    # One pass over the audit trail: per task, its claims, asked-for retries and completions.
    per_task = (
        f"SELECT t.id AS task_id, t.status,"  # quoted table names only
        f" count(*) FILTER (WHERE l.event = 'started') AS starts,"
        f" count(*) FILTER (WHERE l.event = 'retry_scheduled') AS retries,"
        f" count(*) FILTER (WHERE l.event = 'completed') AS completions,"
        f" count(*) FILTER (WHERE l.event = 'redispatched') AS redispatched,"
        f" count(*) FILTER (WHERE l.event = 'lease_expired') AS expired"
        f" FROM {task_table} t LEFT JOIN {log_table} l ON l.task_id = t.id GROUP BY t.id, t.status"
    )
    ((executions, extra, redispatched, expired),) = _rows(
        f"SELECT coalesce(sum(starts), 0), coalesce(sum(greatest(starts - 1 - retries, 0)), 0),"
        f" coalesce(sum(redispatched), 0), coalesce(sum(expired), 0) FROM ({per_task}) per"
    )
    found.executions = int(executions)
    found.duplicates_executed = int(extra)
    found.redispatched = int(redispatched)
    found.leases_expired = int(expired)
    found.duplicates_completed = [
        str(task_id)
        for (task_id,) in _rows(
            f"SELECT task_id FROM ({per_task}) per WHERE completions > 1"
            f" OR (status = %s AND completions <> 1) OR (status <> %s AND completions > 0)",
            [TaskStatus.COMPLETED, TaskStatus.COMPLETED],
        )
    ]
    found.joins_twice = [
        f"{run}/{step}{' (compensation)' if compensation else ''} ×{n}"
        for run, step, compensation, n in _rows(
            f"SELECT workflow_run_id, step, type = 'COMPENSATION', count(*) FROM {task_table}"
            " WHERE workflow_run_id IS NOT NULL GROUP BY 1, 2, 3 HAVING count(*) > 1"
        )
    ]
    found.queues = harness.queue_depths()
    return found


def settle_and_check(window_s: float, *, accepted: Iterable[str] = ()) -> Findings:
    return check(accepted=accepted, settle_s=settle(window_s))
