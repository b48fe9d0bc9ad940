"""Fault 1: pool children and whole workers SIGKILLed again and again while work is in flight.

The issue's size (``QW_CHAOS_SCALE=1``): 2,000 tasks and 50 runs of a ten-step fan-out/fan-in
workflow, five rounds of (one pool child SIGKILLed, one whole worker SIGKILLed and restarted).
"""

from __future__ import annotations

import random
import time

import pytest

from tasks_app.models import TaskStatus
from tests.chaos import harness, invariants, report, workload
from tests.chaos.harness import SERVICE_ENV, scaled
from workflows_app.models import RunStatus, WorkflowRun

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TASKS = scaled(2000, minimum=100)
RUNS = scaled(50, minimum=5)
ROUNDS = scaled(5, minimum=2)
PROCESSES = 4  # two workers of two pool processes
ROUND_S = 6.0  # a round takes about this long (two pauses and a worker restart)
MEAN_SLEEP_MS = harness.mean_sleep_ms(TASKS, ROUNDS * ROUND_S, PROCESSES)
WINDOW_S = 90 + TASKS / 25


@pytest.mark.timeout(int(WINDOW_S + ROUNDS * 30 + 240))
def test_sigkilled_workers_lose_nothing_and_complete_nothing_twice(api, spawn):
    started = time.monotonic()
    # given two workers, beat, TASKS tasks and RUNS workflow runs submitted through the API
    workers = [spawn("worker", **SERVICE_ENV), spawn("worker", **SERVICE_ENV)]
    spawn("beat", **SERVICE_ENV)
    workflow = workload.create_workflow(api, "chaos-kills", workload.fan_out_fan_in())
    bodies = [workload.noop_task(ms) for ms in workload.sleeps(TASKS, 0, 2 * MEAN_SLEEP_MS)]
    half = len(bodies) // 2
    accepted = workload.submit_bulk(api, bodies[:half])
    runs = workload.start_runs(api, workflow, RUNS)
    accepted += workload.submit_bulk(api, bodies[half:])

    # when, round after round, a pool child and then a whole worker are SIGKILLed
    in_flight: list[int] = []
    kills = {"pool child": 0, "whole worker": 0}
    rng = random.Random(1)
    for _ in range(ROUNDS):
        harness.kill_round(workers, spawn, rng, kills, in_flight)

    # then every task and run completes once, and nothing is left behind
    found = invariants.settle_and_check(WINDOW_S, accepted=accepted)
    problems = []
    if min(in_flight) == 0:
        problems.append(f"a kill landed with no work in flight: {in_flight}")
    if found.leases_expired == 0:
        problems.append("no lease expired: no kill landed mid-task")
    if found.by_status != {TaskStatus.COMPLETED: RUNS * 10 + TASKS}:
        problems.append(f"not all completed: {found.by_status}")
    run_statuses = set(WorkflowRun.objects.filter(pk__in=runs).values_list("status", flat=True))
    if run_statuses != {RunStatus.COMPLETED}:
        problems.append(f"runs ended {run_statuses}")
    report.record(
        "1a worker and pool child SIGKILL",
        found,
        injected=sum(kills.values()),
        detail=f"{kills['pool child']} pool children and {kills['whole worker']} whole workers "
        f"SIGKILLed (workers restarted) with {min(in_flight):,}–{max(in_flight):,} tasks "
        f"unfinished; tasks sleep 0–{2 * MEAN_SLEEP_MS} ms",
        wall_s=harness.elapsed_since(started),
        extra={"leases expired": found.leases_expired, "redispatched": found.redispatched},
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems
