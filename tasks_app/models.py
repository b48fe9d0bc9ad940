from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from tasks_app.task_types import TaskType


class TaskStatus(models.TextChoices):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    RETRYING = "RETRYING"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
WAITING_STATUSES = frozenset({TaskStatus.PENDING, TaskStatus.RETRYING})


class FailureClass(models.TextChoices):
    RETRIES_EXHAUSTED = "retries_exhausted"
    NON_RETRYABLE = "non_retryable"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    POISON_MESSAGE = "poison_message"
    INVALID_MESSAGE = "invalid_message"


class Task(models.Model):
    """One unit of typed work. Its status changes only through ``tasks_app.state``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="tasks"
    )
    type = models.CharField(max_length=64)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.PENDING)
    priority = models.PositiveSmallIntegerField(default=0)
    queue = models.CharField(max_length=128)
    retries = models.PositiveIntegerField(default=0)
    max_retries = models.PositiveIntegerField(default=3)
    retry_backoff_s = models.FloatField(null=True, blank=True)
    retry_backoff_max_s = models.FloatField(null=True, blank=True)
    retry_jitter = models.BooleanField(default=True)
    error = models.TextField(blank=True, default="")
    failure_class = models.CharField(
        max_length=32, choices=FailureClass.choices, blank=True, default=""
    )
    result = models.JSONField(null=True, blank=True)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the current wake-up message is due at a worker; null: not yet published.",
    )
    timeout_s = models.PositiveIntegerField(default=300)
    # NULL, not "": the unique (owner, key) constraint must admit many tasks without a key.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    request_hash = models.CharField(max_length=64, blank=True, default="")
    workflow_run = models.ForeignKey(
        "workflows_app.WorkflowRun",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="tasks",
    )
    step = models.CharField(max_length=128, null=True, blank=True)  # noqa: DJ001  # docs/concepts.md
    schedule = models.ForeignKey(
        "workflows_app.Schedule",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="tasks",
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    cancel_requested = models.BooleanField(default=False)
    attempt = models.PositiveIntegerField(
        default=0, help_text="Fencing token: bumped at each claim; a stale worker cannot finish."
    )
    lease_expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Backstop: a running attempt is lost at this time even if its holder lives.",
    )
    holder = models.UUIDField(
        null=True,
        blank=True,
        help_text="The worker process running this attempt (its WorkerHeartbeat); null while "
        "no process runs it (a data task waiting for its batches).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=["owner", "-created_at"], name="task_owner_created"),
            models.Index(fields=["status", "-created_at"], name="task_status_created"),
            models.Index(fields=["type", "-created_at"], name="task_type_created"),
            models.Index(fields=["-created_at"], name="task_created"),
            # The dispatcher and the sweep look only at non-terminal rows.
            models.Index(
                fields=["next_attempt_at"],
                name="task_waiting_due",
                condition=Q(status__in=["PENDING", "RETRYING"]),
            ),
            models.Index(
                fields=["lease_expires_at"],
                name="task_processing_lease",
                condition=Q(status="PROCESSING"),
            ),
            models.Index(
                fields=["failure_class", "-finished_at"],
                name="task_dead_letter",
                condition=Q(status="FAILED"),
            ),
            # Metrics read finished tasks by time window (throughput, durations, error rates).
            models.Index(
                fields=["-finished_at"],
                name="task_finished",
                condition=Q(finished_at__isnull=False),
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                name="task_owner_idempotency_key",
                condition=Q(idempotency_key__isnull=False),
            ),
            models.CheckConstraint(condition=Q(priority__lte=9), name="task_priority_0_9"),
            # Coordination is idempotent: one task per step of a run, one compensation per step.
            models.UniqueConstraint(
                fields=["workflow_run", "step"],
                name="task_one_per_run_step",
                condition=Q(workflow_run__isnull=False) & ~Q(type=TaskType.COMPENSATION),
            ),
            models.UniqueConstraint(
                fields=["workflow_run", "step"],
                name="task_one_compensation_per_run_step",
                condition=Q(workflow_run__isnull=False) & Q(type=TaskType.COMPENSATION),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class LogLevel(models.TextChoices):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class TaskLog(models.Model):
    """One row per lifecycle event: the task's audit trail."""

    id = models.BigAutoField(primary_key=True)
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="logs")
    level = models.CharField(max_length=8, choices=LogLevel.choices, default=LogLevel.INFO)
    event = models.CharField(max_length=32)
    message = models.TextField(blank=True, default="")
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("created_at", "id")
        indexes = [models.Index(fields=["task", "created_at"], name="tasklog_task_created")]

    def __str__(self) -> str:
        return f"{self.task_id} {self.event}"


class DeadLetterMessage(models.Model):
    """A message the application never accepted, taken off ``tasks.dead_letter`` and recorded.

    Tasks that fail for good are dead letters in ``Task`` itself; these are the messages that
    never became a task's work: not JSON, an unknown task name, no such task, a bad id.
    """

    id = models.BigAutoField(primary_key=True)
    failure_class = models.CharField(max_length=32, choices=FailureClass.choices)
    reason = models.CharField(max_length=255)
    queue = models.CharField(max_length=128, blank=True, default="")
    content_type = models.CharField(max_length=128, blank=True, default="")
    task_name = models.CharField(max_length=255, blank=True, default="")
    task_id = models.UUIDField(null=True, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    body_excerpt = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("-created_at",)
        indexes = [models.Index(fields=["-created_at"], name="deadletter_message_created")]

    def __str__(self) -> str:
        return f"{self.failure_class}: {self.reason}"


class Artifact(models.Model):
    """A stored file of rows: a DATA_PROCESSING output, readable as a later task's source.

    The bytes live in the ``artifacts`` storage (``STORAGES``: a local folder or S3); the row
    says whose it is, what it holds and when it expires (``QW_ARTIFACT_TTL_DAYS``).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="artifacts"
    )
    task = models.ForeignKey(
        Task, null=True, blank=True, on_delete=models.SET_NULL, related_name="artifacts"
    )
    name = models.CharField(max_length=512, unique=True, help_text="Path in the storage.")
    format = models.CharField(max_length=8)
    content_type = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField(default=0)
    rows = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ("-created_at",)
        indexes = [models.Index(fields=["expires_at"], name="artifact_expires")]

    def __str__(self) -> str:
        return f"{self.name} ({self.rows} rows)"


class DataJob(models.Model):
    """A DATA_PROCESSING task's input once split into batches: staged once, reused by retries.

    The database, not the chord, decides when the task is done: the merge runs only when every
    batch row is DONE, and a retried attempt finds the staged batches and done work again.
    """

    task = models.OneToOneField(Task, primary_key=True, on_delete=models.CASCADE)
    batches = models.PositiveIntegerField()
    rows_in = models.BigIntegerField()
    schema = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.task_id}: {self.batches} batches"


class BatchStatus(models.TextChoices):
    PENDING = "PENDING"
    DONE = "DONE"
    FAILED = "FAILED"


class DataBatch(models.Model):
    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(DataJob, on_delete=models.CASCADE, related_name="batch_rows")
    index = models.PositiveIntegerField()
    first_row = models.BigIntegerField()
    rows = models.BigIntegerField()
    source = models.CharField(max_length=512, help_text="The staged input, in the storage.")
    output = models.CharField(max_length=512, blank=True, default="")
    status = models.CharField(
        max_length=8, choices=BatchStatus.choices, default=BatchStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, default="")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("job", "index")
        constraints = [
            models.UniqueConstraint(fields=["job", "index"], name="databatch_one_per_index")
        ]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.index} ({self.status})"


class WorkerHeartbeat(models.Model):
    """A process that runs tasks, and when it last said it was alive (database clock).

    Each worker process writes its row every few seconds from a background thread; a task
    whose ``holder`` stopped writing for ``QW_LEASE_SECONDS`` is recovered by the sweep.
    """

    id = models.UUIDField(primary_key=True)
    hostname = models.CharField(max_length=255, blank=True, default="")
    pid = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField()
    beat_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["beat_at"], name="heartbeat_beat_at")]

    def __str__(self) -> str:
        return f"{self.hostname} pid {self.pid}"


class DispatcherLease(models.Model):
    """The leader election of the dispatcher and sweep: one row, held by one process at a time.

    ``last_run_at`` is when the leader last finished a pass; health reports its age.
    """

    name = models.CharField(max_length=32, primary_key=True)
    holder = models.CharField(max_length=255, blank=True, default="")
    acquired_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name}: {self.holder or 'nobody'}"
