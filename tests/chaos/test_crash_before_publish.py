"""Fault 6: the API process commits, then dies before it publishes (docs/reliability.md).

A real process runs the API (``manage.py shell``, DRF's test client) with the publish step
replaced by a SIGKILL of itself: the rows are committed, no message ever leaves. The recovery
sweep must find them and deliver every one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tasks_app.models import Task, TaskLog, TaskStatus
from tests.chaos import harness, invariants, report, workload
from tests.chaos.harness import SERVICE_ENV, scaled
from tests.conftest import ROOT, service_env

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TASKS = scaled(1000, minimum=50)
WINDOW_S = 60 + TASKS / 25

CRASHING_CLIENT = """
import json, os, signal
from rest_framework.test import APIClient
from tasks_app import dispatch

def crash(wakeups):
    os.kill(os.getpid(), signal.SIGKILL)  # committed, about to publish: the process dies

dispatch.publish = crash
client = APIClient()
client.credentials(HTTP_AUTHORIZATION="Token " + os.environ["CHAOS_TOKEN"])
body = json.loads(os.environ["CHAOS_BODY"])
response = client.post(os.environ["CHAOS_PATH"], body, format="json")
print("survived:", response.status_code, response.content[:500])
"""


def _crash_while_posting(token: str, path: str, body: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", CRASHING_CLIENT],
        cwd=ROOT,
        env=service_env(CHAOS_TOKEN=token, CHAOS_PATH=path, CHAOS_BODY=json.dumps(body)),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(int(WINDOW_S + 240))
def test_commit_then_crash_before_publish_is_delivered_by_the_sweep(api, spawn, token):
    started = time.monotonic()
    workflow = workload.create_workflow(api, "chaos-crash", workload.fan_out_fan_in(sleep_ms=10))

    # given API processes that die between their commit and their publish: a single create,
    # a bulk create and a workflow run's start
    requests = [
        ("/api/tasks/", workload.noop_task()),
        ("/api/tasks/bulk/", {"tasks": [workload.noop_task() for _ in range(TASKS)]}),
        (f"/api/workflows/{workflow}/runs/", {}),
    ]
    crashes = [_crash_while_posting(token, path, body) for path, body in requests]
    codes = [c.returncode for c in crashes]
    assert codes == [-signal.SIGKILL] * 3, [c.stdout + c.stderr for c in crashes]
    orphans = list(Task.objects.values_list("pk", flat=True))
    assert len(orphans) == TASKS + 2  # committed, although no client ever got an answer
    assert set(Task.objects.values_list("status", flat=True)) == {TaskStatus.PENDING}
    assert sum(harness.queue_depths().values()) == 0  # and nothing was published

    # when workers and beat run at the shipped defaults (the queues are empty, so a message
    # counts as lost after QW_LOST_MESSAGE_GRACE_S, not QW_REDISPATCH_SECONDS)
    for _ in range(2):
        spawn("worker", **SERVICE_ENV)
    spawn("beat", **SERVICE_ENV)

    # then the sweep publishes every orphan again and everything completes once
    found = invariants.settle_and_check(WINDOW_S, accepted=[str(pk) for pk in orphans])
    problems = []
    if found.by_status != {TaskStatus.COMPLETED: TASKS + 11}:
        problems.append(f"not all completed: {found.by_status}")
    if found.runs_by_status != {"COMPLETED": 1}:
        problems.append(f"the run ended {found.runs_by_status}")
    redispatched = set(
        TaskLog.objects.filter(task_id__in=orphans, event="redispatched").values_list(
            "task_id", flat=True
        )
    )
    if redispatched != set(orphans):
        problems.append(f"{len(orphans) - len(redispatched)} orphans were not redispatched")
    report.record(
        "6 crash between commit and publish",
        found,
        injected=len(crashes),
        detail=f"3 API processes SIGKILLed after their commit, before their publish (a single "
        f"create, a bulk of {TASKS:,}, a run's start): {len(orphans):,} orphaned tasks",
        wall_s=harness.elapsed_since(started),
        extra={"orphans redispatched by the sweep": len(redispatched)},
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems
