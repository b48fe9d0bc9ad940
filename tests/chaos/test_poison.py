"""Fault 4: a poison task that kills its worker process every time it runs.

It must end dead-lettered (FAILED, ``worker_lost``) after ``max_retries + 1`` deliveries that
reached its handler, while the other work on the same queue keeps flowing.
"""

from __future__ import annotations

import time

import pytest

from tasks_app.models import FailureClass, Task, TaskLog, TaskStatus
from tests.chaos import handlers, harness, invariants, report, workload
from tests.chaos.harness import SERVICE_ENV, scaled

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

POISONS = scaled(4, minimum=2)
MAX_RETRIES = 2
TASKS = scaled(1000, minimum=150)
BATCHES = 20  # the ordinary work arrives over BATCHES × PACE_S, while the poison kills
PACE_S = 0.5
STALL_S = 5.0  # an ordinary task waiting longer than this means the queue stalled
WINDOW_S = 90 + TASKS / 25
POISON_ENV = {**SERVICE_ENV, "QW_HANDLER_MODULES": "tests.chaos.handlers"}


@pytest.mark.timeout(int(WINDOW_S + 240))
def test_poison_task_is_dead_lettered_after_bounded_deliveries_without_stalling(api, spawn):
    started = time.monotonic()
    # given two workers and beat, poison tasks and ordinary work on the same queue
    workers = [spawn("worker", **POISON_ENV), spawn("worker", **POISON_ENV)]
    spawn("beat", **POISON_ENV)
    poison = {"type": handlers.POISON, "timeout_s": 1, "max_retries": MAX_RETRIES}
    bodies = [workload.noop_task(ms) for ms in workload.sleeps(TASKS, 0, 20)]
    accepted = []
    for n, part in enumerate(workload.chunks(bodies, -(-len(bodies) // BATCHES))):
        accepted += workload.submit_bulk(api, [poison, *part] if n < POISONS else part)
        time.sleep(PACE_S)
    poison_ids = [
        str(pk) for pk in Task.objects.filter(type=handlers.POISON).values_list("pk", flat=True)
    ]
    assert len(poison_ids) == POISONS

    # when the workers run them (each delivery of a poison task SIGKILLs its pool process)
    found = invariants.settle_and_check(WINDOW_S, accepted=accepted)

    # then each poison task is FAILED worker_lost after max_retries + 1 deliveries
    problems = []
    poisoned = Task.objects.filter(pk__in=poison_ids)
    classes = {(t.status, t.failure_class) for t in poisoned}
    if classes != {(TaskStatus.FAILED, FailureClass.WORKER_LOST)}:
        problems.append(f"poison tasks ended {classes}")
    deliveries = [TaskLog.objects.filter(task_id=pk, event="started").count() for pk in poison_ids]
    if set(deliveries) != {MAX_RETRIES + 1}:
        problems.append(f"poison deliveries {deliveries}, expected {MAX_RETRIES + 1} each")
    dead = {
        row["id"] for row in api.get("/api/queues/dead-letter/?page_size=200").json()["results"]
    }
    if not set(poison_ids) <= dead:
        problems.append("a poison task is missing from /api/queues/dead-letter/")
    # and everything else completed without waiting behind them
    ordinary = Task.objects.exclude(type=handlers.POISON)
    if set(ordinary.values_list("status", flat=True)) != {TaskStatus.COMPLETED}:
        problems.append("ordinary tasks did not all complete")
    waits = sorted(
        (t.finished_at - t.created_at).total_seconds()
        for t in ordinary.only("created_at", "finished_at")
    )
    slowest = round(waits[-1], 2) if waits else None
    if slowest is None or slowest > STALL_S:
        problems.append(f"an ordinary task took {slowest} s from create to done (> {STALL_S} s)")
    if any(w.popen.poll() is not None for w in workers):
        problems.append("a worker's main process died")
    report.record(
        "4 poison task kills its worker",
        found,
        injected=sum(deliveries),
        detail=f"{POISONS} tasks SIGKILL their pool process on every run (max_retries "
        f"{MAX_RETRIES}): {sum(deliveries)} pool processes killed; {TASKS:,} other tasks on "
        "the same queue",
        wall_s=harness.elapsed_since(started),
        extra={
            "slowest ordinary task s (create → completed)": slowest,
            "ordinary p50 s": round(waits[len(waits) // 2], 3) if waits else None,
        },
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems
