"""A user's objects for the security tests: one of each kind the API acts on, and a snapshot of
everything a refused request must leave as it was."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django_celery_beat.models import PeriodicTask

from tasks_app.models import Task, TaskLog, TaskStatus
from tests.factories import TaskFactory
from workflows_app import schedules
from workflows_app import services as workflow_services
from workflows_app.models import Schedule, ScheduleFire, Workflow, WorkflowRun, WorkflowVersion

ONE_STEP = {"start": "a", "steps": {"a": {"type": "NOOP", "payload": {}}}}
INPUT_SCHEMA = {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 64}}}


@dataclass(frozen=True)
class World:
    """Every id a detail or action endpoint takes, owned by ``owner``."""

    owner: Any
    pending: Task  # waiting: a cancel would cancel it
    failed: Task  # a dead letter: retry and redrive would requeue it
    completed: Task  # a compensate would create its COMPENSATION task
    workflow: Workflow
    run: WorkflowRun  # RUNNING: a cancel would stop it
    schedule: Schedule

    def id_for(self, basename: str) -> str:
        """The id for a router basename (``task``, ``workflow``, ``workflow-run``, ``schedule``)."""
        return str(
            {
                "task": self.failed.pk,
                "workflow": self.workflow.pk,
                "workflow-run": self.run.pk,
                "schedule": self.schedule.pk,
            }[basename]
        )


def build_world(owner: Any) -> World:
    pending = TaskFactory(owner=owner)
    TaskLog.objects.create(task=pending, event="created")
    failed = TaskFactory(owner=owner, status=TaskStatus.FAILED, failure_class="non_retryable")
    completed = TaskFactory(owner=owner, status=TaskStatus.COMPLETED, result={"ok": True})
    workflow = workflow_services.workflow_create(
        owner=owner,
        name=f"wf-{owner.pk}",
        definition=ONE_STEP,
        input_schema=INPUT_SCHEMA,
    )
    run = workflow_services.run_start(workflow=workflow, owner=owner, input={"sku": "a"})
    schedule = schedules.schedule_create(
        owner=owner,
        name=f"every-minute-{owner.pk}",
        timing=schedules.Timing(interval_s=60),
        timezone_name="UTC",
        target={"task": {"type": "NOOP"}},
    )
    return World(owner, pending, failed, completed, workflow, run, schedule)


def snapshot() -> dict[str, Any]:
    """Row counts, and the fields the write endpoints change, of every table they write."""
    return {
        "tasks": sorted(
            Task.objects.values_list("id", "status", "cancel_requested", "retries", "payload")
        ),
        "task_logs": TaskLog.objects.count(),
        "workflows": sorted(Workflow.objects.values_list("id", "name", "description", "is_active")),
        "workflow_versions": WorkflowVersion.objects.count(),
        "runs": sorted(WorkflowRun.objects.values_list("id", "status", "cancel_requested")),
        "schedules": sorted(Schedule.objects.values_list("id", "name", "timezone", "overlap")),
        "periodic_tasks": sorted(PeriodicTask.objects.values_list("id", "enabled")),
        "schedule_fires": ScheduleFire.objects.count(),
    }
