"""Which pools run tasks in the worker process itself, whose heartbeat then holds them."""

from __future__ import annotations

import pytest

from queueworker.worker_signals import runs_tasks_in_worker_process


@pytest.mark.parametrize(
    ("pool", "in_worker"),
    [("threads", True), ("prefork", False), ("solo", False), (None, False)],
)
def test_threads_pool_runs_tasks_in_the_worker_process(pool, in_worker):
    # prefork sends worker_process_init in each child, solo in the worker; threads never does
    assert runs_tasks_in_worker_process(pool) is in_worker
