"""Reads on workflows: owner scoping, with the current version's fields annotated."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import JSONField, OuterRef, QuerySet, Subquery

from workflows_app.models import Workflow, WorkflowVersion


def workflow_queryset(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Workflow]:
    """Workflows the user may see (their own; all for staff), each with its current version."""
    latest = WorkflowVersion.objects.filter(workflow=OuterRef("pk")).order_by("-version")
    qs = Workflow.objects.select_related("owner").annotate(
        version=Subquery(latest.values("version")[:1]),
        definition=Subquery(latest.values("definition")[:1], output_field=JSONField()),
        input_schema=Subquery(latest.values("input_schema")[:1], output_field=JSONField()),
    )
    if not getattr(user, "is_staff", False):
        qs = qs.filter(owner_id=user.pk)
    return qs


def workflow_versions(workflow: Workflow) -> QuerySet[WorkflowVersion]:
    return workflow.versions.order_by("-version")
