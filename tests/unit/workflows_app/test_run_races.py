"""Concurrent outcomes and commands on one run: one lock order (run, then tasks), no deadlock,
and one decision however they interleave."""

from __future__ import annotations

import pytest

from queueworker.errors import InvalidTransition
from tasks_app import dispatch, state, worker
from tasks_app.models import TaskStatus
from tests.unit._helpers import run_concurrently
from workflows_app import services
from workflows_app.models import RunStatus

pytestmark = pytest.mark.django_db(transaction=True)

DEFINITION = {
    "start": "a",
    "steps": {
        "a": {"type": "NOOP", "next": ["b", "c"], "compensation": {"type": "NOOP"}},
        "b": {"type": "NOOP", "next": "d"},
        "c": {"type": "NOOP", "next": "d"},
        "d": {"type": "NOOP"},
    },
}


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: len(wakeups))


def _claimed(run, step):
    task = run.tasks.get(step=step)
    return state.claim(task.pk, lease_s=60)


def _complete(task):
    return lambda: worker._finishing(task, lambda: state.complete(task.pk, task.attempt, {}))


@pytest.mark.parametrize("attempt", range(5))
def test_completion_racing_a_cancel_neither_deadlocks_nor_double_decides(user, attempt):
    wf = services.workflow_create(owner=user, name=f"r{attempt}", definition=DEFINITION)
    run = services.run_start(workflow=wf, owner=user, input={})
    worker.run(str(run.tasks.get(step="a").pk), timeout_s=30)
    running = _claimed(run, "b")

    def cancel():
        try:
            return services.run_cancel(run=run, by="ops").status
        except InvalidTransition:
            return "refused"

    completed, _ = run_concurrently(_complete(running), cancel)

    assert completed is True
    run.refresh_from_db()
    # c was waiting: cancelled; b finished; a compensated once; d never started
    for _ in range(10):
        pending = run.tasks.filter(status__in=[TaskStatus.PENDING, TaskStatus.RETRYING]).first()
        if pending is None:
            break
        worker.run(str(pending.pk), timeout_s=30)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert not run.tasks.filter(step="d").exists()
    assert run.tasks.filter(type="COMPENSATION", step="a").count() == 1


@pytest.mark.parametrize("attempt", range(5))
def test_branches_completing_together_start_the_join_once(user, attempt):
    wf = services.workflow_create(owner=user, name=f"j{attempt}", definition=DEFINITION)
    run = services.run_start(workflow=wf, owner=user, input={})
    worker.run(str(run.tasks.get(step="a").pk), timeout_s=30)
    b, c = _claimed(run, "b"), _claimed(run, "c")

    assert run_concurrently(_complete(b), _complete(c)) == [True, True]

    assert run.tasks.filter(step="d").count() == 1
