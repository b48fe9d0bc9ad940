from __future__ import annotations

import pytest

from workflows_app import services

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
