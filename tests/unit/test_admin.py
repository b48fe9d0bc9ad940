"""The Django admin for tasks: changelist, search, change page, and state-machine actions."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.test import Client

from tasks_app.models import Task, TaskLog, TaskStatus
from tests.factories import TaskFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/tasks_app/task/"


@pytest.fixture
def admin_client_(staff_user) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


def _act(client: Client, action: str, *tasks: Task) -> Any:
    return client.post(
        CHANGELIST,
        {"action": action, ACTION_CHECKBOX_NAME: [str(t.pk) for t in tasks], "index": 0},
        follow=True,
    )


def _messages(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_changelist_loads_with_filters(admin_client_, user):
    TaskFactory(owner=user)

    response = admin_client_.get(CHANGELIST)

    assert response.status_code == 200
    changelist = response.context["cl"]
    assert {spec.field_path for spec in changelist.filter_specs} >= {
        "status",
        "type",
        "queue",
        "created_at",
    }
    assert changelist.result_count == 1


def test_changelist_filter_by_status(admin_client_, user):
    failed = TaskFactory(owner=user, status=TaskStatus.FAILED)
    TaskFactory(owner=user, status=TaskStatus.PENDING)

    response = admin_client_.get(CHANGELIST, {"status__exact": "FAILED"})

    assert response.status_code == 200
    assert [t.pk for t in response.context["cl"].result_list] == [failed.pk]


def test_changelist_search_by_id_finds_the_task(admin_client_, user):
    wanted = TaskFactory(owner=user)
    TaskFactory(owner=user)

    response = admin_client_.get(CHANGELIST, {"q": str(wanted.id)})

    assert response.status_code == 200
    assert [t.pk for t in response.context["cl"].result_list] == [wanted.pk]


def test_change_page_shows_logs_inline_and_wait_reason(admin_client_, user, monkeypatch):
    from queueworker import broker

    monkeypatch.setattr(broker, "cached_consumers", lambda name: 1)  # a worker is there
    # given a pending task with two log rows
    task = TaskFactory(owner=user)
    TaskLog.objects.create(task=task, event="created", message="created by someone")
    TaskLog.objects.create(task=task, event="requeued", message="manual retry by ops")

    # when
    response = admin_client_.get(f"{CHANGELIST}{task.pk}/change/")

    # then
    assert response.status_code == 200
    html = response.content.decode()
    assert "Why is it not done?" in html
    assert "queued: Waiting for a worker" in html
    assert "created by someone" in html and "manual retry by ops" in html
    inline = response.context["inline_admin_formsets"][0]
    assert inline.formset.model is TaskLog
    assert inline.formset.queryset.count() == 2


def test_change_page_of_finished_task_is_read_only(admin_client_, user):
    task = TaskFactory(owner=user, status=TaskStatus.COMPLETED)

    response = admin_client_.get(f"{CHANGELIST}{task.pk}/change/")

    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert "Why is it not done?" in response.content.decode()


def test_cancel_then_retry_actions_go_through_the_state_machine(admin_client_, user):
    # given a pending task
    task = TaskFactory(owner=user)

    # when it is cancelled from the admin
    response = _act(admin_client_, "cancel_tasks", task)

    # then it is CANCELLED, with the transition logged
    assert response.status_code == 200
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED
    assert task.finished_at is not None
    assert any("Cancelled or cancel requested: 1" in m for m in _messages(response))

    # when it is retried from the admin
    response = _act(admin_client_, "retry_tasks", task)

    # then it is PENDING again, with retries from 0
    task.refresh_from_db()
    assert task.status == TaskStatus.PENDING
    assert task.retries == 0
    assert task.finished_at is None
    assert any("Retried: 1" in m for m in _messages(response))
    assert list(task.logs.values_list("event", flat=True)) == ["cancelled", "requeued"]


def test_retry_action_refuses_completed_task(admin_client_, user):
    task = TaskFactory(owner=user, status=TaskStatus.COMPLETED, result={"ok": True})

    response = _act(admin_client_, "retry_tasks", task)

    assert response.status_code == 200
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert task.result == {"ok": True}
    assert not task.logs.exists()
    assert any("refused (not FAILED/CANCELLED): 1" in m for m in _messages(response))


def test_cancel_action_refuses_completed_task(admin_client_, user):
    task = TaskFactory(owner=user, status=TaskStatus.COMPLETED)

    response = _act(admin_client_, "cancel_tasks", task)

    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    assert any("refused: 1" in m for m in _messages(response))


def test_admin_requires_staff(client, user):
    client.force_login(user)

    response = client.get(CHANGELIST)

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
