"""Fault 1 for data work: DATA_PROCESSING pipelines in batches (a Celery chord of batch tasks and
a merge) while pool children and whole workers are SIGKILLed.

Beyond the invariants, every pipeline's output must equal what its input gives: a batch
counted twice or lost by a redelivery would show in the aggregates.
"""

from __future__ import annotations

import random
import time

import pytest

from tasks_app.models import Task, TaskStatus
from tests.chaos import harness, invariants, report, workload
from tests.chaos.harness import SERVICE_ENV, scaled

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not workload.data_processing_available(), reason="DATA_PROCESSING is not registered"
    ),
]

PIPELINES = scaled(200, minimum=20)
ROWS = 40
BATCH_SIZE = 10  # four batches a pipeline: a chord of four batch tasks and a merge
ROUNDS = scaled(4, minimum=2)
# Each round brings a wave of pipelines and of ordinary tasks (the filler) that keep the pool
# busy for about FILLER_S: the batches queue behind them, so the kills find pipelines in flight.
# The filler is created one task at a time: a bulk would group it into one multi-id message
# that a single pool process runs in turn, leaving the others free for the batches.
FILLER = 40
FILLER_S = 4.0
TIMEOUT_S = 10  # the lease of a deferred pipeline covers its batches' wait in the queues
WINDOW_S = 120 + PIPELINES / 5


@pytest.mark.timeout(int(WINDOW_S + ROUNDS * 30 + 240))
def test_data_pipelines_survive_sigkills_with_exact_results(api, spawn):
    started = time.monotonic()
    # given two workers and beat
    workers = [spawn("worker", **SERVICE_ENV), spawn("worker", **SERVICE_ENV)]
    spawn("beat", **SERVICE_ENV)
    filler_ms = 2 * harness.mean_sleep_ms(FILLER, FILLER_S)

    # when, round after round, pipelines in batches arrive through the API, and a pool child
    # and then a whole worker are SIGKILLed
    accepted: list[str] = []
    inputs: dict[str, int] = {}
    kills = {"pool child": 0, "whole worker": 0}
    in_flight: list[int] = []
    rng = random.Random(2)
    for wave in workload.chunks(list(range(PIPELINES)), -(-PIPELINES // ROUNDS)):
        bodies = [
            workload.data_task(n, ROWS, batch_size=BATCH_SIZE, timeout_s=TIMEOUT_S) for n in wave
        ]
        ids = workload.submit_bulk(api, bodies)
        inputs.update(zip(ids, wave, strict=True))
        accepted += ids
        filler = [workload.noop_task(ms) for ms in workload.sleeps(FILLER, 0, filler_ms)]
        accepted += workload.submit_each(api, filler)
        harness.kill_round(workers, spawn, rng, kills, in_flight, "DATA_PROCESSING")

    # then every pipeline completes once, with exactly the output of its input
    found = invariants.settle_and_check(WINDOW_S, accepted=accepted)
    problems = []
    if min(in_flight) == 0:
        problems.append(f"a kill landed with no work in flight: {in_flight}")
    if found.by_status != {TaskStatus.COMPLETED: PIPELINES + FILLER * ROUNDS}:
        problems.append(f"not all completed: {found.by_status}")
    wrong = []
    for task in Task.objects.filter(pk__in=list(inputs), status=TaskStatus.COMPLETED):
        rows = (task.result or {}).get("rows", [])
        got = {(r["country"], r["people"], r["total"]) for r in rows}
        if got != workload.data_expected(inputs[str(task.pk)], ROWS):
            wrong.append(str(task.pk))
    if wrong:
        problems.append(f"{len(wrong)} pipelines with a wrong output: {wrong[:5]}")
    report.record(
        "1b data pipelines under SIGKILL",
        found,
        injected=sum(kills.values()),
        detail=f"{kills['pool child']} pool children and {kills['whole worker']} whole workers "
        f"SIGKILLed with {min(in_flight):,}–{max(in_flight):,} pipelines unfinished; "
        f"{PIPELINES:,} pipelines of {ROWS} rows in batches of {BATCH_SIZE}, in {ROUNDS} waves "
        f"with {FILLER} ordinary tasks each",
        wall_s=harness.elapsed_since(started),
        extra={
            "leases expired": found.leases_expired,
            "pipelines with exact output": PIPELINES - len(wrong),
        },
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems
