from __future__ import annotations

import json

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from queueworker.admin_actions import apply_each, outcome_level
from queueworker.redaction import redact
from tasks_app import selectors, services
from tasks_app.models import Artifact, DataBatch, DataJob, DeadLetterMessage, Task, TaskLog


class RedactedLogFields:
    """Log rows through the one redaction rule (secrets never reach an admin page)."""

    @admin.display(description="message")
    def message_redacted(self, log: TaskLog) -> str:
        return str(redact(log.message))

    @admin.display(description="data")
    def data_redacted(self, log: TaskLog) -> str:
        return json.dumps(redact(log.data), default=str)


class TaskLogInline(RedactedLogFields, admin.TabularInline):
    model = TaskLog
    extra = 0
    can_delete = False
    fields = ("created_at", "level", "event", "message_redacted", "data_redacted")
    readonly_fields = fields
    ordering = ("created_at", "id")

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "type",
        "status",
        "queue",
        "priority",
        "retries",
        "max_retries",
        "failure_class",
        "owner",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "type", "queue", "failure_class", "created_at")
    search_fields = ("=id", "idempotency_key", "step")
    date_hierarchy = "created_at"
    list_select_related = ("owner",)
    show_full_result_count = False
    inlines = [TaskLogInline]
    actions = ["cancel_tasks", "retry_tasks", "redrive_dead_letters"]
    readonly_fields = (
        "id",
        "owner",
        "type",
        "status",
        "queue",
        "retries",
        "attempt",
        "error",
        "failure_class",
        "result",
        "next_attempt_at",
        "dispatched_at",
        "lease_expires_at",
        "cancel_requested",
        "idempotency_key",
        "request_hash",
        "parent",
        "step",
        "created_at",
        "started_at",
        "finished_at",
        "wait_reason",
    )
    fieldsets = (
        (None, {"fields": ("id", "type", "status", "wait_reason", "owner", "queue", "priority")}),
        ("Input", {"fields": ("payload_redacted", "timeout_s", "scheduled_at", "idempotency_key")}),
        (
            "Retries",
            {
                "fields": (
                    "retries",
                    "max_retries",
                    "retry_backoff_s",
                    "retry_backoff_max_s",
                    "retry_jitter",
                    "attempt",
                    "next_attempt_at",
                    "dispatched_at",
                    "lease_expires_at",
                )
            },
        ),
        ("Outcome", {"fields": ("result", "error", "failure_class", "cancel_requested")}),
        ("Relations", {"fields": ("parent", "step")}),
        ("Times", {"fields": ("created_at", "started_at", "finished_at")}),
    )

    @admin.display(description="Why is it not done?")
    def wait_reason(self, task: Task) -> str:
        reason = selectors.wait_reason(task)
        if reason is None:
            return "—"
        until = f" (until {reason['until']:%Y-%m-%d %H:%M:%S})" if reason.get("until") else ""
        return f"{reason['code']}: {reason['detail']}{until}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # tasks are created through the API, which validates their payload

    @admin.display(description="payload")
    def payload_redacted(self, task: Task) -> str:
        return json.dumps(redact(task.payload), indent=2, default=str)

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # A task's page is read-only (its fields move through the services: the API and the
        # actions, which need this permission for the list).
        return obj is None and super().has_change_permission(request, obj)

    @admin.action(description="Cancel selected tasks", permissions=["change"])
    def cancel_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        by = request.user.get_username()
        done, refused = apply_each(queryset, lambda task: services.task_cancel(task=task, by=by))
        self.message_user(request, f"Cancelled or cancel requested: {done}; refused: {refused}.")

    @admin.action(description="Retry selected tasks (FAILED or CANCELLED)", permissions=["change"])
    def retry_tasks(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        by = request.user.get_username()
        done, refused = apply_each(queryset, lambda task: services.task_retry(task=task, by=by))
        self.message_user(
            request,
            f"Retried: {done}; refused (not FAILED/CANCELLED): {refused}.",
            outcome_level(refused),
        )

    @admin.action(description="Redrive selected dead letters (FAILED)", permissions=["change"])
    def redrive_dead_letters(self, request: HttpRequest, queryset: QuerySet[Task]) -> None:
        failed = list(queryset.filter(status="FAILED"))
        done = services.dead_letter_redrive(tasks=failed, by=request.user.get_username())
        refused = queryset.count() - len(done)
        self.message_user(
            request, f"Redriven: {len(done)}; not FAILED: {refused}.", outcome_level(refused)
        )


@admin.register(TaskLog)
class TaskLogAdmin(RedactedLogFields, admin.ModelAdmin):
    list_display = ("created_at", "task", "level", "event", "message_redacted")
    list_filter = ("level", "event", "created_at")
    search_fields = ("=task__id",)
    list_select_related = ("task",)
    fields = ("task", "level", "event", "message_redacted", "data_redacted", "created_at")
    readonly_fields = fields
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(DeadLetterMessage)
class DeadLetterMessageAdmin(admin.ModelAdmin):
    """Messages the application refused, recorded from tasks.dead_letter (read-only)."""

    list_display = ("created_at", "failure_class", "reason", "queue", "task_name", "task_id")
    list_filter = ("failure_class", "queue", "created_at")
    search_fields = ("reason", "=task_id", "task_name")
    readonly_fields = (
        "failure_class",
        "reason",
        "queue",
        "content_type",
        "task_name",
        "task_id",
        "headers",
        "body_excerpt",
        "created_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Artifact)
class ArtifactAdmin(admin.ModelAdmin):
    """Stored outputs of DATA_PROCESSING tasks; deleting one here leaves its file to expiry."""

    list_display = (
        "id",
        "task",
        "format",
        "rows",
        "size_bytes",
        "owner",
        "created_at",
        "expires_at",
    )
    list_filter = ("format", "created_at")
    search_fields = ("=id", "=task__id", "name")
    list_select_related = ("owner", "task")
    readonly_fields = (
        "id",
        "owner",
        "task",
        "name",
        "format",
        "content_type",
        "size_bytes",
        "rows",
        "created_at",
        "expires_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class DataBatchInline(admin.TabularInline):
    """A DATA_PROCESSING task's batches while it runs (removed once it has finished)."""

    model = DataBatch
    extra = 0
    can_delete = False
    fields = ("index", "first_row", "rows", "status", "error", "finished_at")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(DataJob)
class DataJobAdmin(admin.ModelAdmin):
    """DATA_PROCESSING tasks in flight: their staged batches and where each one is."""

    list_display = ("task", "batches", "rows_in", "created_at")
    search_fields = ("=task__id",)
    readonly_fields = ("task", "batches", "rows_in", "schema", "created_at")
    inlines = [DataBatchInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
