"""Secrets a user puts in a payload never show on the task admin pages."""

from __future__ import annotations

import pytest

from tasks_app.models import TaskLog
from tests.factories import TaskFactory

pytestmark = pytest.mark.django_db

SECRET = "s3cr3t-token-value-123"


def test_task_change_page_redacts_payload_and_logs(client, staff_user):
    task = TaskFactory(
        owner=staff_user,
        type="HTTP_REQUEST",
        payload={
            "url": "https://api.example.com/",
            "headers": {"Authorization": f"Bearer {SECRET}"},
            "auth": {"type": "bearer", "token": SECRET},
        },
    )
    log = TaskLog.objects.create(
        task=task,
        event="note",
        message=f"Authorization: Bearer {SECRET}",
        data={"headers": {"Authorization": f"Bearer {SECRET}"}},
    )
    client.force_login(staff_user)

    page = client.get(f"/admin/tasks_app/task/{task.pk}/change/")
    log_page = client.get(f"/admin/tasks_app/tasklog/{log.pk}/change/")
    listing = client.get("/admin/tasks_app/tasklog/")

    for response in (page, log_page, listing):
        assert response.status_code == 200
        assert SECRET not in response.content.decode()
    assert "api.example.com" in page.content.decode()  # the rest is still shown
    assert "<textarea" not in page.content.decode()  # read-only: no field to edit
