"""The dispatcher loop during a database outage, its election, and beat's scheduler choice."""

from __future__ import annotations

import logging
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import OperationalError
from django.utils import timezone
from django_celery_beat.schedulers import DatabaseScheduler

from tasks_app import dispatcher, liveness, recovery, scheduler
from tasks_app.dispatcher import FAILURE_REPORT_S, Dispatcher
from tasks_app.models import DispatcherLease


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop(monkeypatch) -> tuple[Dispatcher, Clock]:
    # The pass's control flow only: the database side is replaced (pure logic).
    candidate = Dispatcher("test")
    candidate.dispatch_interval = candidate.sweep_interval = 1.0
    clock = Clock()
    monkeypatch.setattr(dispatcher.time, "monotonic", clock)
    monkeypatch.setattr(dispatcher, "close_old_connections", lambda: None)
    monkeypatch.setattr(liveness, "db_now", timezone.now)
    monkeypatch.setattr(dispatcher, "elect", lambda identity, now: True)
    monkeypatch.setattr(dispatcher, "record_run", lambda identity: None)
    return candidate, clock


def test_a_failing_pass_logs_once_then_every_interval_then_its_recovery(loop, monkeypatch, caplog):
    candidate, clock = loop
    down = OperationalError("connection refused")

    def failing(**kwargs: object) -> int:
        raise down

    monkeypatch.setattr(recovery, "expire_leases", failing)
    monkeypatch.setattr(recovery, "dispatch_due", failing)
    caplog.set_level(logging.INFO, logger="tasks_app.dispatcher")

    # when the database is away for 65 s, a pass every second
    for _ in range(65):
        candidate.run_once()
        clock.now += 1.0
    lines = [r for r in caplog.records if r.name == "tasks_app.dispatcher"]
    lines = [r for r in lines if "leads" not in r.getMessage()]

    # then the first failure has its traceback, and later ones one line each 30 s
    assert [bool(r.exc_info or r.exc_text) for r in lines] == [True, False, False]
    assert [int(r.getMessage().split("after ")[1].split(" s")[0]) for r in lines[1:]] == [
        int(FAILURE_REPORT_S),
        int(2 * FAILURE_REPORT_S),
    ]

    # and when it is back, one line says so
    monkeypatch.setattr(recovery, "expire_leases", lambda **kwargs: 0)
    monkeypatch.setattr(recovery, "dispatch_due", lambda: 0)
    monkeypatch.setattr(recovery, "forget_heartbeats", lambda: 0)
    monkeypatch.setattr("workflows_app.recovery.reconcile_runs", lambda: 0)
    monkeypatch.setattr("tasks_app.artifacts.expire", lambda: 0)
    candidate.run_once()
    assert "works again after 65 s" in caplog.records[-1].getMessage()


def test_a_database_failure_restarts_the_sweeps_healthy_window(loop, monkeypatch):
    candidate, clock = loop
    seen: list[object] = []
    monkeypatch.setattr(recovery, "expire_leases", lambda **kw: seen.append(kw["healthy_since"]))
    monkeypatch.setattr(recovery, "dispatch_due", lambda: 0)
    monkeypatch.setattr(recovery, "forget_heartbeats", lambda: 0)
    monkeypatch.setattr("workflows_app.recovery.reconcile_runs", lambda: 0)
    monkeypatch.setattr("tasks_app.artifacts.expire", lambda: 0)
    candidate.run_once()
    clock.now += 2.0

    # when one pass fails on the database, and the next works
    monkeypatch.setattr(recovery, "dispatch_due", lambda: (_ for _ in ()).throw(OperationalError()))
    candidate.run_once()
    monkeypatch.setattr(recovery, "dispatch_due", lambda: 0)
    clock.now += 2.0
    candidate.run_once()

    # then the sweep after it judges from the new window, not the first
    assert len(seen) == 2 and seen[1] > seen[0]


@pytest.mark.django_db
def test_election_admits_one_leader_until_its_lease_runs_out():
    now = timezone.now()
    # given two candidates
    assert dispatcher.elect("a", now) is True
    assert dispatcher.elect("b", now) is False
    assert dispatcher.elect("a", now + timedelta(seconds=1)) is True

    # when a's lease runs out unrenewed, b takes it, and a no longer leads
    later = now + timedelta(seconds=dispatcher.lease_ttl_s() + 2)
    assert dispatcher.elect("b", later) is True
    assert dispatcher.elect("a", later) is False
    assert DispatcherLease.objects.get().holder == "b"


@pytest.mark.django_db
def test_a_resigned_lease_is_taken_at_once():
    now = timezone.now()
    assert dispatcher.elect("a", now) is True
    dispatcher.resign("a")
    assert dispatcher.elect("b", now) is True


@pytest.mark.django_db
def test_dispatcher_status_names_a_dispatcher_that_never_ran():
    with pytest.raises(dispatcher.DispatcherNotRunning, match="has never run"):
        dispatcher.status()
    dispatcher.elect("a", timezone.now())
    with pytest.raises(dispatcher.DispatcherNotRunning, match="has never run"):
        dispatcher.status()
    dispatcher.record_run("a")
    assert dispatcher.status().startswith("last ran 0 s ago on a")


@pytest.mark.django_db
def test_dispatcher_status_stale_after_a_few_missed_intervals_fails():
    DispatcherLease.objects.create(
        name=dispatcher.LEASE_NAME,
        holder="a",
        last_run_at=timezone.now() - timedelta(seconds=dispatcher.stale_after_s() + 5),
    )
    with pytest.raises(dispatcher.DispatcherNotRunning, match="no worker or beat is running it"):
        dispatcher.status()


class _Service(SimpleNamespace):
    def get_scheduler(self) -> object:
        return SimpleNamespace(kind=self.scheduler_cls)


def test_beat_with_django_scheduler_runs_the_project_scheduler(monkeypatch, caplog):
    stock = DatabaseScheduler.__new__(DatabaseScheduler)
    monkeypatch.setattr(stock, "close", lambda: None, raising=False)
    service = _Service(scheduler=stock, scheduler_cls="django")
    scheduler.ensure_project_scheduler(service)
    assert service.scheduler.kind == scheduler.PROJECT_SCHEDULER
    assert "-S django" in caplog.text


def test_beat_with_a_foreign_scheduler_refuses_naming_the_command():
    service = _Service(scheduler=object(), scheduler_cls="celery.beat:PersistentScheduler")
    with pytest.raises(SystemExit, match="celery -A queueworker beat"):
        scheduler.ensure_project_scheduler(service)
