"""The dispatcher loop during a database outage, its election, and beat's scheduler choice."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import OperationalError
from django.utils import timezone
from django_celery_beat.schedulers import DatabaseScheduler

from tasks_app import dispatcher, liveness, recovery, worker
from tasks_app.dispatcher import FAILURE_REPORT_S, Dispatcher
from tasks_app.models import DispatcherLease, Task, TaskStatus, WorkerHeartbeat
from tests.unit._helpers import make_task
from workflows_app import scheduler


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
    monkeypatch.setattr("tasks_app.hooks.reconcile", lambda: None)
    monkeypatch.setattr("tasks_app.artifacts.expire", lambda: 0)
    candidate.run_once()
    assert "works again after 65 s" in caplog.records[-1].getMessage()


def test_a_database_failure_restarts_the_sweeps_healthy_window(loop, monkeypatch):
    candidate, clock = loop
    seen: list[object] = []
    monkeypatch.setattr(recovery, "expire_leases", lambda **kw: seen.append(kw["healthy_since"]))
    monkeypatch.setattr(recovery, "dispatch_due", lambda: 0)
    monkeypatch.setattr(recovery, "forget_heartbeats", lambda: 0)
    monkeypatch.setattr("tasks_app.hooks.reconcile", lambda: None)
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


# --- the sweep's judgement: heartbeats, the backstop, the outage window -------------------------


def _heartbeat(age_s: float) -> uuid.UUID:
    now = timezone.now()
    beat = WorkerHeartbeat.objects.create(
        id=uuid.uuid4(), started_at=now, beat_at=now - timedelta(seconds=age_s)
    )
    return beat.id


def _running(holder: uuid.UUID | None, *, lease_in_s: float = 300) -> Task:
    return make_task(
        TaskStatus.PROCESSING,
        holder=holder,
        lease_expires_at=timezone.now() + timedelta(seconds=lease_in_s),
    )


@pytest.fixture
def lease_30(settings):
    settings.QW_LEASE_SECONDS = 30


@pytest.mark.django_db
def test_sweep_recovers_a_task_whose_holder_stopped_beating(lease_30):
    # given a task whose backstop lease has minutes left, and whose holder last beat 31 s ago
    holder = _heartbeat(age_s=31)
    task = _running(holder)

    # then the sweep counts a lost attempt now, naming the heartbeat
    assert recovery.expire_leases() == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.RETRYING and task.retries == 1
    assert "stopped sending heartbeats" in task.error
    # and its log says which process was lost and by which rule
    log = task.logs.get(event="lease_expired")
    assert (log.data["holder"], log.data["by"]) == (str(holder), "heartbeat")


@pytest.mark.django_db
def test_sweep_leaves_a_task_whose_holder_beats(lease_30):
    task = _running(_heartbeat(age_s=5))
    assert recovery.expire_leases() == 0
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING


@pytest.mark.django_db
def test_sweep_recovers_a_task_whose_holder_has_no_heartbeat_row(lease_30):
    task = _running(uuid.uuid4())
    assert recovery.expire_leases() == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.RETRYING


@pytest.mark.django_db
def test_sweep_recovers_a_live_holders_task_past_its_backstop(lease_30):
    task = _running(_heartbeat(age_s=1), lease_in_s=-1)
    assert recovery.expire_leases() == 1
    task.refresh_from_db()
    assert "lease expired" in task.error


@pytest.mark.django_db
def test_sweep_judges_nothing_until_it_reached_the_database_for_a_whole_lease(lease_30):
    # given a stale heartbeat and an expired backstop, seen by a sweeper that reconnected 10 s ago
    stale = _running(_heartbeat(age_s=120))
    expired = _running(None, lease_in_s=-1)
    now = timezone.now()

    # then it recovers neither; 31 s after its reconnection it recovers both
    assert recovery.expire_leases(now=now, healthy_since=now - timedelta(seconds=10)) == 0
    later = now + timedelta(seconds=21)
    assert recovery.expire_leases(now=later, healthy_since=now - timedelta(seconds=10)) == 2
    assert {t.status for t in Task.objects.filter(pk__in=[stale.pk, expired.pk])} == {
        TaskStatus.RETRYING
    }


@pytest.mark.django_db
def test_a_deferred_attempt_is_released_so_only_its_lease_bounds_it(monkeypatch, lease_30):
    # given a claim by a process whose heartbeat then stops, and a handler that defers
    # (a data task whose batches now run elsewhere)
    from tasks_app.errors import Deferred
    from tasks_app.handlers import registry

    def deferring(ctx: object, payload: object) -> object:
        raise Deferred("batches dispatched")

    registry.register("TEST_DEFERRING", schema={"type": "object"})(deferring)
    try:
        holder = _heartbeat(age_s=0)
        monkeypatch.setattr(liveness, "holder", lambda: holder)
        task = make_task(TaskStatus.PENDING, type="TEST_DEFERRING")
        outcome = worker.run(str(task.id), timeout_s=task.timeout_s, worker="w1")
    finally:
        registry._specs.pop("TEST_DEFERRING", None)
    assert outcome.status == "deferred"
    WorkerHeartbeat.objects.filter(pk=holder).update(beat_at=timezone.now() - timedelta(seconds=60))

    # then the sweep does not take it for lost: no process holds it, its lease runs
    assert recovery.expire_leases() == 0
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING and task.holder is None
