from __future__ import annotations

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.test import Client
from django.utils import timezone

from tasks_app import dispatch, worker
from tasks_app.models import TaskStatus
from workflows_app import services
from workflows_app.models import RunStatus, WorkflowRun

pytestmark = pytest.mark.django_db


def test_workflow_change_page_lists_its_versions(client, staff_user):
    workflow = services.workflow_create(
        owner=staff_user, name="order", definition={"start": "a", "steps": {"a": {"type": "NOOP"}}}
    )
    services.workflow_update(
        workflow=workflow,
        by=staff_user,
        definition={"start": "b", "steps": {"b": {"type": "NOOP"}}},
    )
    client.force_login(staff_user)

    page = client.get(f"/admin/workflows_app/workflow/{workflow.pk}/change/")
    listing = client.get("/admin/workflows_app/workflow/?q=order")

    assert page.status_code == 200
    content = page.content.decode()
    assert "Workflow versions" in content and "&quot;start&quot;: &quot;b&quot;" in content
    assert listing.status_code == 200 and "order" in listing.content.decode()


# --- workflow runs -----------------------------------------------------------------------------

RUNS = "/admin/workflows_app/workflowrun/"
SAGA = {
    "start": "reserve",
    "steps": {
        "reserve": {"type": "NOOP", "next": ["charge", "notify"], "compensation": {"type": "NOOP"}},
        "charge": {
            "type": "NOOP",
            "payload": {"result": "x" * 500},
            "next": "ship",
            "compensation": {"type": "NOOP"},
        },
        "notify": {"type": "NOOP", "next": "ship"},
        "ship": {"type": "NOOP", "payload": {"fail": True}, "next": "invoice"},
        "invoice": {"type": "NOOP"},
    },
}


@pytest.fixture
def published(monkeypatch):
    sent = []
    monkeypatch.setattr(dispatch, "publish", lambda wakeups: sent.extend(wakeups) or len(wakeups))
    return sent


@pytest.fixture
def staff_client(staff_user) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def _drive(run: WorkflowRun) -> WorkflowRun:
    for _ in range(50):
        waiting = run.tasks.filter(status__in=[TaskStatus.PENDING, TaskStatus.RETRYING])
        task = waiting.order_by("created_at").first()
        if task is None:
            break
        waiting.filter(pk=task.pk).update(next_attempt_at=timezone.now())
        worker.run(str(task.pk), timeout_s=30)
    run.refresh_from_db()
    return run


def _start(owner, definition=SAGA, name="saga") -> WorkflowRun:
    workflow = services.workflow_create(owner=owner, name=name, definition=definition)
    return services.run_start(workflow=workflow, owner=owner, input={})


def _act_on_runs(client: Client, action: str, *runs: WorkflowRun):
    return client.post(
        RUNS,
        {"action": action, ACTION_CHECKBOX_NAME: [str(r.pk) for r in runs], "index": 0},
        follow=True,
    )


def test_run_change_page_is_read_only_and_draws_the_graph_with_every_step(
    staff_client, staff_user, published
):
    # given a saga whose fourth step failed and whose two compensations ran
    run = _drive(_start(staff_user))
    assert run.status == RunStatus.COMPENSATED

    # when
    response = staff_client.get(f"{RUNS}{run.pk}/change/")

    # then the page holds one SVG naming every step, with the undo path
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    html = response.content.decode()
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="qwg"') == 1
    for name in SAGA["steps"]:
        assert f">{name}</text>" in html
    assert 'class="qwg-undo-edge" data-from="ship" data-to="charge"' in html
    assert "step ship failed" in html
    # and the steps and compensations inline, from the run's tasks
    inlines = {f.opts.verbose_name_plural: f for f in response.context["inline_admin_formsets"]}
    steps = inlines["steps (in the order they started)"].formset.queryset
    undone = inlines["compensations (in the order they started)"].formset.queryset
    assert sorted(t.step for t in steps) == ["charge", "notify", "reserve", "ship"]
    assert [t.step for t in undone] == ["charge", "reserve"]
    assert "x" * 150 in html and "x" * 250 not in html  # the result is an excerpt


def test_run_changelist_filters_and_finds_a_run_by_id(staff_client, staff_user, published):
    wanted = _start(staff_user)
    other = _start(staff_user, {"start": "a", "steps": {"a": {"type": "NOOP"}}}, name="other")

    listing = staff_client.get(RUNS)
    found = staff_client.get(RUNS, {"q": str(wanted.pk)})
    by_workflow = staff_client.get(RUNS, {"workflow__id__exact": str(other.workflow_id)})
    nonsense = staff_client.get(RUNS, {"q": "not-a-uuid"})

    assert listing.status_code == 200
    assert {s.field_path for s in listing.context["cl"].filter_specs} == {
        "status",
        "workflow",
        "created_at",
    }
    assert [r.pk for r in found.context["cl"].result_list] == [wanted.pk]
    assert [r.pk for r in by_workflow.context["cl"].result_list] == [other.pk]
    assert nonsense.status_code == 200


def test_cancel_action_cancels_a_running_run_and_refuses_a_finished_one(
    staff_client, staff_user, published
):
    running = _start(staff_user)
    finished = _drive(_start(staff_user, name="done"))

    response = _act_on_runs(staff_client, "cancel_runs", running, finished)

    running = _drive(running)
    assert running.status == RunStatus.CANCELLED and running.cancel_requested
    assert any("Cancelled: 1; refused (already finished): 1." in m for m in _messages(response))


def test_retry_action_resumes_a_failed_run(staff_client, staff_user, published):
    definition = {
        "start": "a",
        "steps": {
            "a": {"type": "NOOP", "next": "b"},
            "b": {"type": "NOOP", "payload": {"fail_times": 1}, "max_retries": 0},
        },
    }
    failed = _drive(_start(staff_user, definition))
    completed = _drive(_start(staff_user, {"start": "a", "steps": {"a": {"type": "NOOP"}}}, "ok"))
    assert (failed.status, completed.status) == (RunStatus.FAILED, RunStatus.COMPLETED)

    response = _act_on_runs(staff_client, "retry_runs", failed, completed)

    assert _drive(failed).status == RunStatus.COMPLETED
    assert any("Retried: 1; refused (not FAILED): 1." in m for m in _messages(response))


def test_run_admin_requires_staff(client, user):
    client.force_login(user)

    assert client.get(RUNS).status_code == 302
