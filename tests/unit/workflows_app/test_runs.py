"""Runs, fan-out/fan-in, data passing and saga compensation, driven through the real worker
pipeline (``worker.run``) on the database; only publishing to the broker is replaced."""

from __future__ import annotations

import pytest
from django.utils import timezone

from queueworker.errors import InvalidInput, InvalidTransition
from tasks_app import dispatch, worker
from tasks_app.models import TaskLog, TaskStatus
from workflows_app import coordinator, services
from workflows_app.models import RunStatus, WorkflowRun
from workflows_app.recovery import reconcile_runs

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def published(monkeypatch):
    sent: list[dispatch.Wakeup] = []
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: sent.extend(wakeups) or len(wakeups))
    return sent


def noop(**extra):
    return {"type": "NOOP", "payload": extra.pop("payload", {}), **extra}


def undo(**payload):
    return {"type": "NOOP", "payload": payload}


def start(user, definition, input=None, **workflow):
    wf = services.workflow_create(
        owner=user,
        name=workflow.get("name", "wf"),
        definition=definition,
        input_schema=workflow.get("input_schema"),
    )
    return services.run_start(workflow=wf, owner=user, input=input or {})


def drive(run: WorkflowRun, limit: int = 100) -> WorkflowRun:
    """Run every waiting task of the run through the pipeline until nothing is left."""
    for _ in range(limit):
        waiting = run.tasks.filter(status__in=[TaskStatus.PENDING, TaskStatus.RETRYING])
        task = waiting.order_by("created_at").first()
        if task is None:
            break
        waiting.filter(pk=task.pk).update(next_attempt_at=timezone.now())  # skip backoff waits
        worker.run(str(task.pk), timeout_s=30)
    run.refresh_from_db()
    return run


def by_step(run):
    return {t.step: t for t in run.tasks.exclude(type="COMPENSATION")}


def compensations(run):
    return list(run.tasks.filter(type="COMPENSATION").order_by("finished_at"))


def test_linear_run_passes_data_from_input_and_earlier_steps(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(payload={"result": {"$ref": "input.sku"}}, next="b"),
            "b": noop(
                payload={"result": {"$ref": "[steps.a.result.result, steps.a.status]"}}, next="c"
            ),
            "c": noop(payload={"result": {"$ref": "steps.b.result.result[0]"}}),
        },
    }
    run = drive(start(user, definition, {"sku": "A-1"}))

    assert run.status == RunStatus.COMPLETED and run.finished_at
    steps = by_step(run)
    assert steps["b"].result["result"] == ["A-1", "COMPLETED"]
    assert steps["c"].result["result"] == "A-1"


def test_fan_out_and_fan_in_joins_once_after_the_last_branch(user, published):
    definition = {
        "start": "split",
        "steps": {
            "split": noop(next=["b1", "b2", "b3"]),
            "b1": noop(next="join"),
            "b2": noop(next="join"),
            "b3": noop(next="join"),
            "join": noop(payload={"result": {"$ref": "[steps.b1.status, steps.b3.status]"}}),
        },
    }
    run = start(user, definition)
    worker.run(str(by_step(run)["split"].pk), timeout_s=30)
    branches = by_step(run)
    assert set(branches) == {"split", "b1", "b2", "b3"}  # the three go out together

    for name in ("b1", "b2"):
        worker.run(str(branches[name].pk), timeout_s=30)
        assert "join" not in by_step(run)  # waits for every predecessor
    worker.run(str(branches["b3"].pk), timeout_s=30)
    # a duplicated completion decides nothing new
    coordinator.task_finished(by_step(run)["b3"])

    run = drive(run)
    assert run.status == RunStatus.COMPLETED
    assert run.tasks.filter(step="join").count() == 1
    steps = by_step(run)
    join = steps["join"]
    assert join.result["result"] == ["COMPLETED", "COMPLETED"]
    assert join.created_at >= max(steps[n].finished_at for n in ("b1", "b2", "b3"))


def test_failure_of_step_3_compensates_steps_2_and_1_in_that_order(user):
    definition = {
        "start": "s1",
        "steps": {
            "s1": noop(next="s2", compensation=undo(result={"$ref": "steps.s1.task"})),
            "s2": noop(next="s3", compensation=undo(result="undo 2")),
            "s3": noop(payload={"fail": True}),
        },
    }
    run = drive(start(user, definition))

    assert run.status == RunStatus.COMPENSATED, run.error
    assert run.error.startswith("step s3 failed")
    undone = compensations(run)
    assert [c.step for c in undone] == ["s2", "s1"]
    steps = by_step(run)
    assert undone[0].parent_id == steps["s2"].pk
    # a $ref in the action sees the compensated step
    assert undone[1].result["result"]["result"] == str(steps["s1"].pk)
    assert undone[1].payload["compensates"] == str(steps["s1"].pk)


def test_compensation_that_fails_for_good_ends_the_run_failed_naming_it(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(
                next="b", compensation={"type": "NOOP", "payload": {"fail": True}, "max_retries": 0}
            ),
            "b": noop(payload={"fail": True}),
        },
    }
    run = drive(start(user, definition))

    assert run.status == RunStatus.FAILED
    assert "compensation of step a failed" in run.error
    failed = compensations(run)[0]
    assert failed.status == TaskStatus.FAILED and failed.failure_class == "non_retryable"


def test_failed_step_with_nothing_to_compensate_fails_and_retry_resumes_from_it(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(next="b"),
            "b": noop(payload={"fail_times": 1}, max_retries=0, next="c"),
            "c": noop(),
        },
    }
    run = drive(start(user, definition))
    assert run.status == RunStatus.FAILED
    assert "no completed step declared a compensation" in run.error
    a_result = by_step(run)["a"].result

    services.run_retry(run=run, by="ops")
    run = drive(run)

    assert run.status == RunStatus.COMPLETED
    steps = by_step(run)
    assert steps["a"].result == a_result and steps["a"].attempt == 1  # kept, not re-run
    assert steps["b"].attempt == 2
    with pytest.raises(InvalidTransition):
        services.run_retry(run=run, by="ops")


def test_retry_of_a_failed_compensation_continues_the_undo(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(next="b", compensation=undo(result="undo a")),
            "b": noop(
                next="c",
                compensation={"type": "NOOP", "payload": {"fail_times": 1}, "max_retries": 0},
            ),
            "c": noop(payload={"fail": True}),
        },
    }
    run = drive(start(user, definition))
    assert run.status == RunStatus.FAILED and "compensation of step b" in run.error

    run = drive(services.run_retry(run=run, by="ops"))

    assert run.status == RunStatus.COMPENSATED
    assert [c.step for c in compensations(run)] == ["b", "a"]


def test_cancel_stops_waiting_steps_compensates_and_ends_cancelled(user):
    definition = {
        "start": "a",
        "steps": {"a": noop(next="b", compensation=undo()), "b": noop(next="c"), "c": noop()},
    }
    run = start(user, definition)
    worker.run(str(by_step(run)["a"].pk), timeout_s=30)  # a done; b waiting

    run = services.run_cancel(run=run, by="ops")
    run = drive(run)

    assert run.status == RunStatus.CANCELLED and run.cancel_requested
    steps = by_step(run)
    assert steps["b"].status == TaskStatus.CANCELLED and "c" not in steps
    assert [c.step for c in compensations(run)] == ["a"]
    with pytest.raises(InvalidTransition):
        services.run_cancel(run=run, by="ops")


def test_cancel_waits_for_a_running_step_and_asks_it_to_stop(user):
    run = start(user, {"start": "a", "steps": {"a": noop()}})
    step = by_step(run)["a"]
    from tasks_app import state

    claimed = state.claim(step.pk, lease_s=60)  # a worker has it
    services.run_cancel(run=run, by="ops")
    run.refresh_from_db()
    assert run.status == RunStatus.COMPENSATING
    assert by_step(run)["a"].cancel_requested

    # the handler notices and stops; that outcome lets the run finish
    state.cancel_running(step.pk, claimed.attempt)
    coordinator.task_finished(by_step(run)["a"])
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED


def test_cancelling_a_step_task_through_the_task_api_starts_the_undo(user, api):
    definition = {"start": "a", "steps": {"a": noop(next="b", compensation=undo()), "b": noop()}}
    run = start(user, definition)
    worker.run(str(by_step(run)["a"].pk), timeout_s=30)

    assert api.post(f"/api/tasks/{by_step(run)['b'].pk}/cancel/").status_code == 200

    run = drive(run)
    assert run.status == RunStatus.COMPENSATED and "step b was cancelled" in run.error


def test_legacy_definition_runs_as_a_chain(user):
    legacy = {"initialTask": {"type": "NOOP", "payload": {"result": 1}}}
    run = drive(start(user, legacy))
    assert run.status == RunStatus.COMPLETED and list(by_step(run)) == ["step1"]


def test_inactive_workflow_refuses_runs_and_input_schema_is_checked(user):
    wf = services.workflow_create(
        owner=user,
        name="x",
        definition={"start": "a", "steps": {"a": noop()}},
        input_schema={
            "type": "object",
            "required": ["sku"],
            "properties": {"sku": {"type": "string"}},
        },
    )
    with pytest.raises(InvalidInput) as excinfo:
        services.run_start(workflow=wf, owner=user, input={"sku": 5})
    assert excinfo.value.detail == {"input": ['sku: 5 is not of type "string"']}

    services.workflow_update(workflow=wf, by=user, is_active=False)
    wf.refresh_from_db()
    with pytest.raises(InvalidTransition):
        services.run_start(workflow=wf, owner=user, input={"sku": "a"})
    assert WorkflowRun.objects.count() == 0


def test_a_payload_that_becomes_invalid_after_ref_fails_the_step(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(next="b"),
            "b": noop(payload={"sleep_ms": {"$ref": "input.delay"}}),
        },
    }
    run = drive(start(user, definition, {"delay": "soon"}))
    assert run.status == RunStatus.FAILED
    assert "invalid payload after $ref: sleep_ms" in by_step(run)["b"].error


def test_run_keeps_its_version_when_the_definition_changes(user):
    wf = services.workflow_create(
        owner=user, name="v", definition={"start": "a", "steps": {"a": noop(next="b"), "b": noop()}}
    )
    run = services.run_start(workflow=wf, owner=user, input={})
    services.workflow_update(
        workflow=wf, by=user, definition={"start": "a", "steps": {"a": noop()}}
    )

    run = drive(run)

    assert run.status == RunStatus.COMPLETED and set(by_step(run)) == {"a", "b"}
    assert run.version.version == 1


def test_reconcile_finishes_a_run_whose_decision_was_missed(user):
    run = start(user, {"start": "a", "steps": {"a": noop()}})
    step = by_step(run)["a"]
    # an operator completes the step behind the coordinator's back
    type(step).objects.filter(pk=step.pk).update(
        status=TaskStatus.COMPLETED, finished_at=timezone.now()
    )
    WorkflowRun.objects.filter(pk=run.pk).update(
        updated_at=timezone.now() - timezone.timedelta(minutes=1)
    )

    assert reconcile_runs() == 1

    run.refresh_from_db()
    assert run.status == RunStatus.COMPLETED


def test_compensation_is_recorded_against_the_task_it_undoes(user):
    definition = {
        "start": "a",
        "steps": {"a": noop(next="b", compensation=undo()), "b": noop(payload={"fail": True})},
    }
    run = drive(start(user, definition))
    a = by_step(run)["a"]
    assert TaskLog.objects.filter(task=a, event="compensated").count() == 1


# --- $ref bounds ---------------------------------------------------------------------------------

DOUBLING = "input.x" + " | [@,@][]" * 20  # 2**20 elements (3.1 MB) from a 1-element input


def test_step_whose_ref_makes_too_much_fails_at_start_and_the_saga_compensates(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(next=["b", "c"], compensation=undo(result="undo a")),
            "b": noop(payload={"result": {"$ref": DOUBLING}}),
            "c": noop(),
        },
    }

    run = drive(start(user, definition, {"x": [1]}))

    assert run.status == RunStatus.COMPENSATED, run.error
    steps = by_step(run)
    assert steps["b"].status == TaskStatus.FAILED
    assert steps["b"].failure_class == "non_retryable"
    assert steps["b"].error.startswith("could not start: steps.b.payload")
    assert "QW_MAX_PAYLOAD_BYTES" in steps["b"].error
    assert steps["b"].payload == {"result": {"$ref": DOUBLING}}  # as declared, not resolved
    assert steps["c"].status == TaskStatus.CANCELLED  # no new step runs once one failed
    assert run.error.startswith("step b failed: could not start")
    assert [c.step for c in compensations(run)] == ["a"]


def test_first_step_whose_ref_errors_fails_the_run_instead_of_raising(user):
    definition = {
        "start": "a",
        "steps": {"a": noop(payload={"result": {"$ref": "length(input.n)"}})},
    }

    run = start(user, definition, {"n": 5})

    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert "could not start: steps.a.payload.result.$ref: In function length()" in run.error
    assert by_step(run)["a"].status == TaskStatus.FAILED


def test_retry_of_a_step_that_could_not_start_resolves_its_ref_again(user, settings):
    # given a step whose resolved payload is over the limit
    settings.QW_MAX_PAYLOAD_BYTES = 2048
    definition = {
        "start": "a",
        "steps": {"a": noop(next="b"), "b": noop(payload={"result": {"$ref": "input.text"}})},
    }
    run = drive(start(user, definition, {"text": "x" * 3000}))
    assert run.status == RunStatus.FAILED and "over 2048 bytes" in run.error

    # when the limit still holds, a retry changes nothing
    with pytest.raises(InvalidTransition) as excinfo:
        services.run_retry(run=run, by="ops")
    assert "Step b still cannot start" in excinfo.value.detail["detail"]
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED

    # then, once the limit is raised, the retry starts it with its $ref resolved
    settings.QW_MAX_PAYLOAD_BYTES = 1024 * 1024
    run = drive(services.run_retry(run=run, by="ops"))

    assert run.status == RunStatus.COMPLETED, run.error
    assert by_step(run)["b"].result["result"] == "x" * 3000


def test_compensation_whose_ref_errors_fails_the_run_naming_it(user):
    definition = {
        "start": "a",
        "steps": {
            "a": noop(
                payload={"result": 7},
                next="b",
                compensation=undo(result={"$ref": "length(steps.a.result.result)"}),
            ),
            "b": noop(payload={"fail": True}),
        },
    }

    run = drive(start(user, definition))

    assert run.status == RunStatus.FAILED
    assert "compensation of step a failed" in run.error
    assert "could not start: action.payload.result.$ref: In function length()" in run.error
