"""Reads on workflows: owner scoping, with the current version's fields annotated."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import JSONField, OuterRef, QuerySet, Subquery

from tasks_app.models import Task
from workflows_app.models import Workflow, WorkflowRun, WorkflowVersion


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


def run_queryset(user: AbstractBaseUser | AnonymousUser) -> QuerySet[WorkflowRun]:
    qs = WorkflowRun.objects.select_related("workflow", "version", "owner")
    if not getattr(user, "is_staff", False):
        qs = qs.filter(owner_id=user.pk)
    return qs


def run_steps(run: WorkflowRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's steps in graph order (``task`` null until started) and its compensations."""
    from workflows_app import coordinator, runs

    tasks = list(Task.objects.filter(workflow_run=run).order_by("created_at"))
    by_step = runs.step_tasks(tasks)
    graph = coordinator.graph_for(run)
    steps = []
    done = {n for n, t in by_step.items() if t.status == "COMPLETED"}
    for name in graph.order:
        task = by_step.get(name)
        waiting = None
        if task is None and run.status == "RUNNING":
            missing = [p for p in graph.predecessors[name] if p not in done]
            waiting = {
                "code": "waiting_for_predecessors",
                "detail": f"Starts once {', '.join(missing)} completed.",
            }
        steps.append(
            {
                "name": name,
                "type": graph.steps[name].type,
                "task": task.id if task else None,
                "status": task.status if task else None,
                "result": task.result if task else None,
                "attempts": task.attempt if task else 0,
                "started_at": task.started_at if task else None,
                "finished_at": task.finished_at if task else None,
                "wait_reason": waiting,
            }
        )
    compensations = [
        {"step": t.step, "task": t.id, "status": t.status, "finished_at": t.finished_at}
        for t in tasks
        if t.type == runs.COMPENSATION_TYPE
    ]
    return steps, compensations
