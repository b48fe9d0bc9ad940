"""Workflow runs on a real worker: data passing, fan-out/fan-in, saga undo, cancel."""

from __future__ import annotations

import pytest

from tasks_app.models import TaskStatus
from tests.conftest import wait_for
from workflows_app.models import WorkflowRun

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _run(api, definition, run_input=None):
    workflow = api.post("/api/workflows/", {"name": "wf", "definition": definition}, format="json")
    assert workflow.status_code == 201, workflow.content
    run = api.post(
        f"/api/workflows/{workflow.json()['id']}/runs/", {"input": run_input or {}}, format="json"
    )
    assert run.status_code == 201, run.content
    return run.json()["id"]


def _finished(api, run_id, timeout=30):
    def done():
        run = api.get(f"/api/workflow-runs/{run_id}/").json()
        return run if run["status"] not in ("RUNNING", "COMPENSATING") else None

    return wait_for(done, timeout=timeout)


def test_fan_out_fan_in_with_data_passing_completes(api, worker):
    definition = {
        "start": "split",
        "steps": {
            "split": {
                "type": "NOOP",
                "payload": {"result": {"$ref": "input.order"}},
                "next": ["b1", "b2", "b3"],
            },
            "b1": {"type": "NOOP", "payload": {"sleep_ms": 300}, "next": "join"},
            "b2": {"type": "NOOP", "payload": {"sleep_ms": 50}, "next": "join"},
            "b3": {"type": "NOOP", "payload": {"sleep_ms": 150}, "next": "join"},
            "join": {"type": "NOOP", "payload": {"result": {"$ref": "steps.split.result.result"}}},
        },
    }
    run = _finished(api, _run(api, definition, {"order": 42}))

    assert run["status"] == "COMPLETED", run
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["join"]["result"]["result"] == 42
    assert steps["join"]["started_at"] >= max(steps[b]["finished_at"] for b in ("b1", "b2", "b3"))
    assert WorkflowRun.objects.get(pk=run["id"]).tasks.filter(step="join").count() == 1


def test_failure_compensates_completed_steps_in_reverse_order(api, worker):
    undo = {"type": "NOOP", "payload": {}}
    definition = {
        "start": "s1",
        "steps": {
            "s1": {"type": "NOOP", "next": "s2", "compensation": undo},
            "s2": {"type": "NOOP", "next": "s3", "compensation": undo},
            "s3": {"type": "NOOP", "payload": {"fail": True}},
        },
    }
    run = _finished(api, _run(api, definition))

    assert run["status"] == "COMPENSATED"
    assert [c["step"] for c in run["compensations"]] == ["s2", "s1"]
    assert all(c["status"] == TaskStatus.COMPLETED for c in run["compensations"])
    assert run["compensations"][0]["finished_at"] < run["compensations"][1]["finished_at"]


def test_cancel_while_a_slow_step_runs_ends_cancelled(api, worker):
    definition = {
        "start": "a",
        "steps": {
            "a": {"type": "NOOP", "next": "slow", "compensation": {"type": "NOOP"}},
            "slow": {"type": "NOOP", "payload": {"sleep_ms": 20000}},
        },
    }
    run_id = _run(api, definition)
    wait_for(
        lambda: (
            {
                s["name"]: s["status"]
                for s in api.get(f"/api/workflow-runs/{run_id}/").json()["steps"]
            }["slow"]
            == "PROCESSING"
        )
    )

    assert api.post(f"/api/workflow-runs/{run_id}/cancel/").status_code == 202
    run = _finished(api, run_id, timeout=10)

    assert run["status"] == "CANCELLED"
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["slow"]["status"] == "CANCELLED"
    assert [c["step"] for c in run["compensations"]] == ["a"]
