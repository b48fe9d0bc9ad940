from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Workflow(models.Model):
    """A named workflow; its definition lives in versions, the latest of which is current."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="workflows"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("-created_at",)
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="workflow_owner_name"),
        ]
        indexes = [models.Index(fields=["owner", "-created_at"], name="workflow_owner_created")]

    def __str__(self) -> str:
        return self.name


class WorkflowVersion(models.Model):
    """One definition of a workflow, never changed once stored (a run keeps its version)."""

    id = models.BigAutoField(primary_key=True)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    definition = models.JSONField(help_text="The canonical form (legacy definitions normalised).")
    input_schema = models.JSONField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("workflow", "-version")
        constraints = [
            models.UniqueConstraint(fields=["workflow", "version"], name="workflow_version_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.workflow_id} v{self.version}"


class RunStatus(models.TextChoices):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINISHED_RUN_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.FAILED, RunStatus.CANCELLED}
)


class WorkflowRun(models.Model):
    """One execution of a workflow version. Its steps and compensations are Tasks."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workflow = models.ForeignKey(Workflow, on_delete=models.PROTECT, related_name="runs")
    version = models.ForeignKey(WorkflowVersion, on_delete=models.PROTECT, related_name="runs")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="workflow_runs"
    )
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.RUNNING)
    input = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    schedule = models.ForeignKey(
        "workflows_app.Schedule",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="runs",
    )

    class Meta:
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="run_owner_created"),
            models.Index(fields=["workflow", "-created_at"], name="run_workflow_created"),
            models.Index(fields=["status", "-created_at"], name="run_status_created"),
        ]

    def __str__(self) -> str:
        return f"{self.workflow_id} run {self.id} ({self.status})"


class Overlap(models.TextChoices):
    ALLOW = "allow"
    SKIP = "skip"


class Schedule(models.Model):
    """A schedule of the owner's (docs/schedules.md): what to create on each fire, and the overlap
    rule; its timing lives in django-celery-beat's ``PeriodicTask`` (one to one)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="schedules"
    )
    name = models.CharField(max_length=200)
    periodic_task = models.OneToOneField(
        "django_celery_beat.PeriodicTask", on_delete=models.CASCADE, related_name="qw_schedule"
    )
    timezone = models.CharField(max_length=64, default="UTC")
    target = models.JSONField(help_text="{task: {type, payload, …}} or {workflow: id, input}")
    overlap = models.CharField(max_length=8, choices=Overlap.choices, default=Overlap.ALLOW)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("-created_at",)
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="schedule_owner_name"),
        ]

    def __str__(self) -> str:
        return self.name


class ScheduleFire(models.Model):
    """One fire of a schedule: its slot (the due time) is unique, so a slot fires once."""

    id = models.BigAutoField(primary_key=True)
    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="fires")
    slot = models.DateTimeField()
    manual = models.BooleanField(default=False, help_text="A trigger, not a beat slot.")
    skipped = models.BooleanField(default=False, help_text="overlap=skip: the previous ran on.")
    error = models.TextField(blank=True, default="")
    task = models.ForeignKey(
        "tasks_app.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    run = models.ForeignKey(
        WorkflowRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    fired_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-fired_at",)
        constraints = [
            models.UniqueConstraint(
                fields=["schedule", "slot"],
                condition=models.Q(manual=False),
                name="schedule_fire_slot_once",
            ),
        ]
        indexes = [models.Index(fields=["schedule", "-fired_at"], name="schedule_fire_recent")]

    def __str__(self) -> str:
        return f"{self.schedule_id} @ {self.slot:%Y-%m-%dT%H:%M:%SZ}"
