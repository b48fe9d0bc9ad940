"""Fault 3: PostgreSQL connections terminated mid-run, and PostgreSQL unreachable for 30 s.

Connections are terminated with ``pg_terminate_backend`` on this session's database only; the
outage is a proxy between the workers and beat and PostgreSQL, switched off (the machine's
PostgreSQL keeps running: others use it). The API (in this process) keeps its own connection.
"""

from __future__ import annotations

import time

import pytest

from tasks_app.models import TaskStatus
from tests.chaos import harness, invariants, report, workload
from tests.chaos.harness import OUTAGE_S, SERVICE_ENV, scaled

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TASKS = scaled(1000, minimum=100)
RUNS = scaled(20, minimum=3)
TERMINATIONS = scaled(4, minimum=2)
WINDOW_S = 120 + TASKS / 25


def _submit(api, name: str, busy_s: float) -> tuple[list[str], list[str], str]:
    """TASKS tasks and RUNS runs that keep the workers busy for about ``busy_s``."""
    workflow = workload.create_workflow(api, name, workload.fan_out_fan_in(sleep_ms=20))
    high_ms = 2 * harness.mean_sleep_ms(TASKS, busy_s)
    bodies = [workload.noop_task(ms) for ms in workload.sleeps(TASKS, 0, high_ms)]
    accepted = workload.submit_bulk(api, bodies[: TASKS // 2])
    runs = workload.start_runs(api, workflow, RUNS)
    accepted += workload.submit_bulk(api, bodies[TASKS // 2 :])
    return accepted, runs, workflow


def _expectations(found: invariants.Findings, runs: int) -> list[str]:
    problems = []
    if found.by_status != {TaskStatus.COMPLETED: found.tasks}:
        problems.append(f"not all completed: {found.by_status}")
    if found.runs_by_status != {"COMPLETED": runs}:
        problems.append(f"runs: {found.runs_by_status}")
    return problems


@pytest.mark.timeout(int(WINDOW_S + 240))
def test_database_connections_terminated_mid_run(api, spawn):
    started = time.monotonic()
    # given two workers and beat with work in flight
    for _ in range(2):
        spawn("worker", **SERVICE_ENV)
    spawn("beat", **SERVICE_ENV)
    accepted, runs, _ = _submit(api, "chaos-pg-terminate", busy_s=TERMINATIONS * 1.5 + 3)

    # when every other backend of this session's database is terminated, again and again
    terminated, in_flight = [], []
    for _ in range(TERMINATIONS):
        time.sleep(1.5)
        in_flight.append(harness.unfinished_tasks())
        terminated.append(harness.terminate_backends())

    # then every task and run completes once
    found = invariants.settle_and_check(WINDOW_S, accepted=accepted)
    problems = _expectations(found, len(runs))
    if min(terminated) == 0:
        problems.append(f"a round found no backend to terminate: {terminated}")
    if min(in_flight) == 0:
        problems.append(f"a round landed with no work in flight: {in_flight}")
    report.record(
        "3a PostgreSQL backends terminated",
        found,
        injected=len(terminated),
        detail=f"pg_terminate_backend on the session's database {len(terminated)}× mid-run "
        f"({'/'.join(map(str, terminated))} backends) with {min(in_flight):,}–"
        f"{max(in_flight):,} tasks unfinished",
        wall_s=harness.elapsed_since(started),
        extra={"leases expired": found.leases_expired},
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems


@pytest.mark.timeout(int(WINDOW_S + OUTAGE_S + 240))
def test_database_unreachable_then_back_loses_nothing(api, spawn, services):
    started = time.monotonic()
    # given workers and beat that reach PostgreSQL through a proxy, with work in flight
    proxy = services.proxy(harness.database_url())
    database = {"DATABASE_URL": harness.via_proxy(harness.database_url(), proxy)}
    for _ in range(2):
        spawn("worker", **SERVICE_ENV, **database)
    spawn("beat", **SERVICE_ENV, **database)
    accepted, runs, workflow = _submit(api, "chaos-pg-outage", busy_s=5)
    time.sleep(1.0)

    # when the database is unreachable for OUTAGE_S while the API keeps accepting work
    in_flight = harness.unfinished_tasks()
    proxy.off()
    outage_started = time.monotonic()
    n = 0
    while time.monotonic() - outage_started < OUTAGE_S:
        accepted += workload.submit_bulk(api, [workload.noop_task(10) for _ in range(10)])
        n += 1
        if n % 10 == 0:
            runs += workload.start_runs(api, workflow, 1)
        time.sleep(0.5)
    proxy.on()

    # then every task accepted before, during and after completes once
    found = invariants.settle_and_check(WINDOW_S, accepted=accepted)
    problems = _expectations(found, len(runs))
    if in_flight == 0:
        problems.append("the outage began with no work in flight")
    report.record(
        "3b PostgreSQL unreachable",
        found,
        injected=1,
        detail=f"database unreachable for {OUTAGE_S:g} s for workers and beat (proxy off, "
        f"connections reset) from {in_flight:,} tasks unfinished; {n * 10} tasks created "
        "meanwhile",
        wall_s=harness.elapsed_since(started),
        extra={"leases expired": found.leases_expired, "redispatched": found.redispatched},
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems
