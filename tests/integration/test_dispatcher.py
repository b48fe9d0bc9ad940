"""The dispatcher and sweep run in every worker and beat, one at a time (leader election)."""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone

from tasks_app import dispatcher, recovery
from tasks_app.models import DispatcherLease, Task
from tests.chaos import harness
from tests.conftest import Proc, service_env, wait_for
from tests.factories import TaskFactory

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

METRICS_TOKEN = "dispatcher-test-token"


@pytest.fixture(autouse=True)
def _fresh_health(settings):
    settings.QW_HEALTH_CACHE_S = 0
    settings.QW_METRICS_TOKEN = METRICS_TOKEN


@pytest.fixture
def empty_queues():
    harness.purge_queues()
    yield
    harness.purge_queues()


def _messages() -> int:
    return sum(harness.queue_depths().values())


def _lease() -> DispatcherLease | None:
    return DispatcherLease.objects.filter(name=dispatcher.LEASE_NAME).first()


def test_two_dispatchers_at_once_publish_each_due_task_once(empty_queues, settings):
    # given 600 due tasks that no message announces yet (one message per task: the queue's
    # depth then counts publications)
    settings.QW_MESSAGE_MAX_TASKS = 1
    owner = TaskFactory().owner
    Task.objects.all().delete()
    past = timezone.now() - timedelta(seconds=1)
    TaskFactory.create_batch(600, owner=owner, next_attempt_at=past, dispatched_at=None)

    # when two dispatchers run dispatch_due at the same time, in small batches, again and again
    published: list[int] = []
    start = threading.Barrier(2)

    def dispatch_loop() -> None:
        try:
            start.wait()
            for _ in range(20):
                published.append(recovery.dispatch_due(batch=25))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=dispatch_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then between them they published each task once: 600 messages in the queue, not more
    assert sum(published) == 600
    wait_for(lambda: _messages() >= 600, timeout=10)
    time.sleep(0.5)
    assert _messages() == 600
    assert not Task.objects.filter(dispatched_at__isnull=True).exists()


def test_two_beats_and_a_worker_publish_delayed_tasks_once_each(api, spawn, empty_queues):
    # given two beats and a worker (three dispatcher candidates) that consumes nothing, each
    # publishing one message per task so that the queue's depth counts publications
    for _ in range(2):
        spawn("beat", QW_DISPATCH_INTERVAL_S="0.2", QW_MESSAGE_MAX_TASKS="1")
    spawn("worker", queues="compensation", QW_DISPATCH_INTERVAL_S="0.2", QW_MESSAGE_MAX_TASKS="1")

    # when 200 tasks are delayed half a second
    bodies = [{"type": "NOOP", "delay_ms": 500} for _ in range(200)]
    response = api.post("/api/tasks/bulk/", {"tasks": bodies}, format="json")
    assert response.status_code == 201

    # then each is published once, by whichever leads
    wait_for(lambda: not Task.objects.filter(dispatched_at__isnull=True).exists(), timeout=20)
    wait_for(lambda: _messages() >= 200, timeout=10)
    time.sleep(1.0)
    assert _messages() == 200


@pytest.mark.parametrize("kind", ["beat", "worker"])
def test_leader_killed_another_candidate_takes_over_within_seconds(spawn, kind):
    # given two candidates of a kind (default intervals: a pass a second, a 3 s lease)
    procs = [spawn(kind) for _ in range(2)]
    lease = wait_for(lambda: (row := _lease()) and row.last_run_at and row, timeout=15)
    pid = int(re.search(r"pid (\d+)", lease.holder).group(1))
    leader = next(p for p in procs if p.popen.pid == pid)

    # when the leader is SIGKILLed
    killed_at = timezone.now()
    started = time.monotonic()
    leader.kill(signal.SIGKILL)

    # then the other takes the lease and runs within seconds
    wait_for(
        lambda: (row := _lease()).holder != lease.holder and row.last_run_at > killed_at,
        timeout=15,
        interval=0.1,
    )
    took = time.monotonic() - started
    print(f"\n{kind} leader SIGKILLed -> new leader ran in {took:.1f} s")
    assert took <= dispatcher.lease_ttl_s() + 2 * 1.0 + 1.0


def test_health_names_a_dispatcher_that_has_not_run_then_reports_its_last_run(client, spawn):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {METRICS_TOKEN}"}
    # given no worker and no beat: health fails naming it
    response = client.get("/api/health/", **auth)
    assert response.status_code == 503
    assert "dispatcher" in response.json()["failing"]
    assert "has never run" in response.json()["checks"]["dispatcher"]["detail"]
    # and readiness names it as a warning: this web process can still accept work
    response = client.get("/api/health/ready/", **auth)
    assert response.status_code == 200
    assert response.json()["warnings"] == ["dispatcher"]
    assert "has never run" in response.json()["checks"]["dispatcher"]["detail"]

    # when a worker starts, its dispatcher runs
    spawn("worker")

    # then readiness passes and says when and where the dispatcher last ran
    body = wait_for(
        lambda: (
            (r := client.get("/api/health/ready/", **auth)).json()["warnings"] == [] and r.json()
        ),
        timeout=15,
    )
    assert re.match(r"last ran \d+ s ago on worker ", body["checks"]["dispatcher"]["detail"])


def test_health_fails_when_the_dispatcher_stopped_running(client, spawn):
    # given a worker whose dispatcher ran, then the worker gone for good
    worker = spawn("worker")
    wait_for(lambda: (row := _lease()) and row.last_run_at, timeout=15)
    worker.kill(signal.SIGKILL)
    DispatcherLease.objects.update(
        last_run_at=timezone.now() - timedelta(seconds=dispatcher.stale_after_s() + 1)
    )

    # then health fails naming it
    response = client.get("/api/health/", HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}")
    assert response.status_code == 503
    assert "dispatcher" in response.json()["failing"]
    assert "no worker or beat is running it" in response.json()["checks"]["dispatcher"]["detail"]


def _beat(tmp_path, scheduler: str) -> Proc:
    argv = [sys.executable, "-m", "celery", "-A", "queueworker", "beat", "-S", scheduler]
    argv += ["-l", "INFO", "-s", str(tmp_path / "beat-schedule")]
    env = service_env(QW_DISPATCH_INTERVAL_S="0.2")
    return Proc(f"beat-{scheduler}", argv, env, tmp_path / "beat.log")


def test_beat_with_the_django_scheduler_runs_the_projects_and_dispatches(api, tmp_path):
    # given beat started as django-celery-beat documents it (-S django), and no worker
    beat = _beat(tmp_path, "django")
    try:
        beat.wait_for_output("beat: Starting...")

        # then it says that it runs the project's scheduler, and it dispatches due work
        beat.wait_for_output("running workflows_app.scheduler:QueueWorkerScheduler")
        body = {"type": "NOOP", "delay_ms": 200}
        task_id = api.post("/api/tasks/", body, format="json").json()["id"]
        wait_for(lambda: Task.objects.get(pk=task_id).dispatched_at is not None, timeout=15)
    finally:
        beat.stop()


def test_beat_with_a_scheduler_that_ignores_our_schedules_refuses_to_start(tmp_path):
    beat = _beat(tmp_path, "celery.beat:PersistentScheduler")
    try:
        assert beat.popen.wait(timeout=60) != 0
        assert "run `celery -A queueworker beat`" in beat.output()
    finally:
        beat.stop()
