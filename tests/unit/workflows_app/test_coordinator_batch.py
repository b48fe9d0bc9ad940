"""The coordinator's cost per step and its batched entry point (``tasks_finished``), on the
real database: statements of one linear step completion, and many outcomes decided at once."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from tasks_app import dispatch, state, worker
from tasks_app.models import TaskLog, TaskStatus
from workflows_app import coordinator, services
from workflows_app.models import RunStatus

pytestmark = pytest.mark.django_db

LINEAR = {
    "start": "a",
    "steps": {
        "a": {"type": "NOOP", "next": "b", "compensation": {"type": "NOOP"}},
        "b": {"type": "NOOP", "next": "c"},
        "c": {"type": "NOOP"},
    },
}
JOIN = {
    "start": "a",
    "steps": {
        "a": {"type": "NOOP", "next": ["b", "c"]},
        "b": {"type": "NOOP", "next": "d"},
        "c": {"type": "NOOP", "next": "d"},
        "d": {"type": "NOOP"},
    },
}


@pytest.fixture(autouse=True)
def published(monkeypatch):
    sent: list[dispatch.Wakeup] = []
    monkeypatch.setattr(
        dispatch, "publish", lambda wakeups, **_: sent.extend(wakeups) or len(wakeups)
    )
    return sent


def _start(user, definition, name):
    wf = services.workflow_create(owner=user, name=name, definition=definition)
    return services.run_start(workflow=wf, owner=user, input={})


def _claimed(run, step):
    return state.claim(run.tasks.get(step=step).pk, lease_s=60)


def test_one_linear_step_completion_costs_four_statements(
    user, published, django_capture_on_commit_callbacks
):
    run = _start(user, LINEAR, "count")
    coordinator.graph_for(run)  # the graph is cached per version, read once per process
    task = _claimed(run, "a")
    published.clear()

    with (
        django_capture_on_commit_callbacks(execute=True),
        CaptureQueriesContext(connection) as queries,
    ):
        assert worker._finishing(task, lambda: state.complete(task.pk, task.attempt, {}))

    # (in a test the transaction is a savepoint: its SAVEPOINT and RELEASE are not counted)
    statements = [
        q["sql"]
        for q in queries.captured_queries
        if not q["sql"].startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "BEGIN", "COMMIT"))
    ]
    # lock the run, record the outcome with its log row, read the run's tasks, insert the
    # next step's task with its log row
    assert len(statements) == 4, "\n".join(statements)
    b = run.tasks.get(step="b")
    assert b.status == TaskStatus.PENDING
    assert list(b.logs.values_list("event", flat=True)) == ["created"]
    assert [w.task_id for w in published] == [str(b.pk)]


def _complete_together(tasks):
    """The batched recording: runs locked first, outcomes recorded, one decision."""
    with transaction.atomic():
        runs = coordinator.lock_runs(t.workflow_run_id for t in tasks)
        for t in tasks:
            assert state.complete(t.pk, t.attempt, {"n": t.step})
        finished = [type(t).objects.get(pk=t.pk) for t in tasks]
        wakeups = coordinator.tasks_finished(finished, runs=runs)
    return wakeups


def test_batch_of_several_runs_starts_each_next_step_once_in_one_insert(user, published):
    runs = [_start(user, LINEAR, f"r{i}") for i in range(3)]
    tasks = [_claimed(r, "a") for r in runs]
    published.clear()

    with CaptureQueriesContext(connection) as queries:
        wakeups = _complete_together(tasks)

    inserts = [q for q in queries.captured_queries if "INSERT INTO" in q["sql"]]
    # three outcomes (each with its log row), then one insert for the three next steps
    assert len(inserts) == 4
    assert not published  # the caller publishes the returned wake-ups
    created = {str(r.tasks.get(step="b").pk) for r in runs}
    assert {w.task_id for w in wakeups} == created
    for r in runs:
        assert r.tasks.filter(step="b").count() == 1
        assert (
            TaskLog.objects.filter(task__workflow_run=r, task__step="b", event="created").count()
            == 1
        )


def test_batch_with_both_branches_of_a_join_starts_the_join_once(user):
    run = _start(user, JOIN, "join")
    worker.run(str(run.tasks.get(step="a").pk), timeout_s=30)
    b, c = _claimed(run, "b"), _claimed(run, "c")

    wakeups = _complete_together([b, c])

    joins = run.tasks.filter(step="d")
    assert joins.count() == 1
    assert [w.task_id for w in wakeups] == [str(joins.get().pk)]
    # a late duplicate of the same outcomes decides nothing new
    with transaction.atomic():
        assert coordinator.tasks_finished([b, c]) == []
    assert joins.count() == 1


def test_batch_with_a_failure_plans_the_compensation_as_a_single_completion_does(user):
    failing = _start(user, LINEAR, "fails")
    passing = _start(user, LINEAR, "passes")
    worker.run(str(failing.tasks.get(step="a").pk), timeout_s=30)
    broken, fine = _claimed(failing, "b"), _claimed(passing, "a")

    with transaction.atomic():
        runs = coordinator.lock_runs([failing.pk, passing.pk])
        state.fail(broken.pk, broken.attempt, error="boom", failure_class="non_retryable")
        state.complete(fine.pk, fine.attempt, {})
        wakeups = coordinator.tasks_finished(
            [type(broken).objects.get(pk=broken.pk), type(fine).objects.get(pk=fine.pk)],
            runs=runs,
        )

    failing.refresh_from_db()
    assert failing.status == RunStatus.COMPENSATING
    assert failing.error == "step b failed: boom"
    undo = failing.tasks.get(type="COMPENSATION")
    assert undo.step == "a" and undo.parent_id == failing.tasks.get(step="a", type="NOOP").pk
    assert {w.task_id for w in wakeups} == {str(undo.pk), str(passing.tasks.get(step="b").pk)}

    # the compensation completing in a batch is recorded against the step it undoes
    claimed = state.claim(undo.pk, lease_s=60)
    _complete_together([claimed])
    failing.refresh_from_db()
    assert failing.status == RunStatus.COMPENSATED
    assert failing.tasks.get(step="a", type="NOOP").logs.filter(event="compensated").count() == 1


def test_batch_that_finishes_a_run_completes_it(user):
    run = _start(user, LINEAR, "done")
    for step in ("a", "b"):
        worker.run(str(run.tasks.get(step=step).pk), timeout_s=30)
    assert _complete_together([_claimed(run, "c")]) == []
    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED


def test_a_message_of_several_runs_steps_is_decided_in_one_transaction_and_published_together(
    user, monkeypatch, django_capture_on_commit_callbacks
):
    # given one message waking the first steps of four runs, and a join's two branches
    runs = [_start(user, LINEAR, f"m{i}") for i in range(4)]
    join = _start(user, JOIN, "join-in-a-message")
    worker.run(str(join.tasks.get(step="a").pk), timeout_s=30)
    ids = [str(r.tasks.get(step="a").pk) for r in runs]
    ids += [str(join.tasks.get(step=s).pk) for s in ("b", "c")]
    publications: list[list[dispatch.Wakeup]] = []
    monkeypatch.setattr(
        dispatch, "publish", lambda wakeups, **_: publications.append(list(wakeups)) or 0
    )

    # when the worker runs the message (completions written together)
    with django_capture_on_commit_callbacks(execute=True):
        report = worker.run_batch(ids, timeout_s=10, worker="w1", background=False)

    # then every outcome is written in one statement with its runs decided in it: each run's
    # next step exists once, the join once, and their wake-ups leave in one publication
    assert report.outcomes == {"completed": 6}
    assert report.writes == 1
    nexts = [r.tasks.get(step="b") for r in runs] + [join.tasks.get(step="d")]
    assert all(t.status == TaskStatus.PENDING for t in nexts)
    assert len(publications) == 1
    assert sorted(w.task_id for w in publications[0]) == sorted(str(t.pk) for t in nexts)
