"""Beat's recovery sweep during a database outage: it keeps going, and logs sparingly."""

from __future__ import annotations

import logging

import pytest
from django.db import OperationalError

from tasks_app import recovery, scheduler
from tasks_app.scheduler import FAILURE_REPORT_S, QueueWorkerScheduler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def beat(monkeypatch) -> tuple[QueueWorkerScheduler, Clock]:
    # The sweep's state only: the scheduler's database side is not under test here.
    sched = QueueWorkerScheduler.__new__(QueueWorkerScheduler)
    sched.dispatch_interval = sched.sweep_interval = 1.0
    sched._next_dispatch = sched._next_sweep = 0.0
    sched._failing_since = None
    sched._last_failure_report = 0.0
    clock = Clock()
    monkeypatch.setattr(scheduler.time, "monotonic", clock)
    monkeypatch.setattr(scheduler, "close_old_connections", lambda: None)
    return sched, clock


def test_a_failing_sweep_logs_once_then_every_interval_then_its_recovery(beat, monkeypatch, caplog):
    sched, clock = beat
    down = OperationalError("connection refused")

    def failing() -> int:
        raise down

    monkeypatch.setattr(recovery, "expire_leases", failing)
    monkeypatch.setattr(recovery, "dispatch_due", failing)
    caplog.set_level(logging.INFO, logger="tasks_app.scheduler")

    # when the database is away for 65 s, beat ticking every second
    for _ in range(65):
        sched.run_recovery()
        clock.now += 1.0
    lines = [r for r in caplog.records if r.name == "tasks_app.scheduler"]

    # then the first failure has its traceback, and later ones one line each 30 s
    assert [bool(r.exc_info or r.exc_text) for r in lines] == [True, False, False]
    assert [int(r.getMessage().split("after ")[1].split(" s")[0]) for r in lines[1:]] == [
        int(FAILURE_REPORT_S),
        int(2 * FAILURE_REPORT_S),
    ]

    # and when it is back, one line says so
    monkeypatch.setattr(recovery, "expire_leases", lambda: 0)
    monkeypatch.setattr(recovery, "dispatch_due", lambda: 0)
    monkeypatch.setattr("workflows_app.recovery.reconcile_runs", lambda: 0)
    monkeypatch.setattr("tasks_app.artifacts.expire", lambda: 0)
    sched.run_recovery()
    assert "works again after 65 s" in caplog.records[-1].getMessage()
