"""Workflow runs survive a worker SIGKILLed again and again (docs/reliability.md)."""

from __future__ import annotations

import signal
import time

import pytest
from django.db.models import Count

from tasks_app.models import TaskLog, TaskStatus
from tests.conftest import wait_for
from workflows_app.models import RunStatus, WorkflowRun

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

RUNS = 20
KILLS = 3
SWEEP = {"QW_SWEEP_INTERVAL_S": "0.3", "QW_DISPATCH_INTERVAL_S": "0.2", "QW_LEASE_SECONDS": "1"}


def _ten_step_fan_out_fan_in() -> dict:
    step = {"type": "NOOP", "payload": {"sleep_ms": 60}, "timeout_s": 3, "max_retries": 8}
    steps = {"start": {**step, "next": ["a1", "b1", "c1", "d1"]}}
    for branch in "abcd":
        steps[f"{branch}1"] = {**step, "next": f"{branch}2"}
        steps[f"{branch}2"] = {**step, "next": "join"}
    steps["join"] = {**step, "payload": {"result": {"$ref": "[steps.a2.status, steps.d2.status]"}}}
    assert len(steps) == 10
    return {"start": "start", "steps": steps}


def test_runs_complete_once_while_the_worker_is_killed_repeatedly(api, spawn):
    # given 20 runs of a 10-step fan-out/fan-in workflow in flight
    workflow = api.post(
        "/api/workflows/",
        {"name": "chaos", "definition": _ten_step_fan_out_fan_in()},
        format="json",
    ).json()
    worker = spawn("worker", **SWEEP)
    spawn("beat", **SWEEP)
    run_ids = [
        api.post(f"/api/workflows/{workflow['id']}/runs/", {}, format="json").json()["id"]
        for _ in range(RUNS)
    ]

    # when the whole worker is SIGKILLed mid-flight, several times
    for _ in range(KILLS):
        time.sleep(1.2)
        worker.kill(signal.SIGKILL)
        worker = spawn("worker", **SWEEP)

    # then every run completes, each step recorded COMPLETED once, each join fired once
    def all_finished() -> bool:
        return not WorkflowRun.objects.filter(
            pk__in=run_ids, status__in=[RunStatus.RUNNING, RunStatus.COMPENSATING]
        ).exists()

    wait_for(all_finished, timeout=120, interval=0.5)
    statuses = dict(WorkflowRun.objects.filter(pk__in=run_ids).values_list("pk", "status"))
    assert set(statuses.values()) == {RunStatus.COMPLETED}, statuses
    per_run = (
        WorkflowRun.objects.filter(pk__in=run_ids)
        .annotate(n=Count("tasks"))
        .values_list("n", flat=True)
    )
    assert set(per_run) == {10}
    for run in WorkflowRun.objects.filter(pk__in=run_ids):
        tasks = list(run.tasks.all())
        assert sorted(t.step for t in tasks) == sorted(_ten_step_fan_out_fan_in()["steps"])
        assert {t.status for t in tasks} == {TaskStatus.COMPLETED}
    completions = (
        TaskLog.objects.filter(task__workflow_run__in=run_ids, event="completed")
        .values("task")
        .annotate(n=Count("id"))
        .values_list("n", flat=True)
    )
    assert len(completions) == RUNS * 10 and set(completions) == {1}
    # and the kills did land mid-task: lost attempts were recovered from expired leases
    assert TaskLog.objects.filter(task__workflow_run__in=run_ids, event="lease_expired").exists()
