from __future__ import annotations

import json

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from queueworker.admin_actions import apply_each, outcome_level
from tasks_app.models import Task
from workflows_app import coordinator, graph, runs, selectors, services
from workflows_app.models import Schedule, Workflow, WorkflowRun, WorkflowVersion

RESULT_EXCERPT_CHARS = 200


class WorkflowVersionInline(admin.TabularInline):
    model = WorkflowVersion
    extra = 0
    can_delete = False
    fields = ("version", "definition", "input_schema", "created_by", "created_at")
    readonly_fields = fields
    ordering = ("-version",)

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # a new version comes from a changed definition, validated by the API


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "is_active", "created_at", "updated_at")
    list_filter = ("is_active", "created_at")
    search_fields = ("name", "=id")
    list_select_related = ("owner",)
    readonly_fields = ("id", "owner", "created_at", "updated_at")
    fields = ("id", "name", "description", "is_active", "owner", "created_at", "updated_at")
    inlines = [WorkflowVersionInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # definitions are validated by the API on write


class _RunTaskInline(admin.TabularInline):
    """A run's tasks, read-only; a subclass picks steps or compensations."""

    model = Task
    fk_name = "workflow_run"
    extra = 0
    can_delete = False
    show_change_link = True
    ordering = ("created_at",)

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # tasks move through the run's actions or their own admin page

    @admin.display(description="result or error")
    def result_excerpt(self, task: Task) -> str:
        if task.result is None:
            return task.error[:RESULT_EXCERPT_CHARS] if task.error else "—"
        text = json.dumps(task.result, ensure_ascii=False, sort_keys=True)
        if len(text) > RESULT_EXCERPT_CHARS:
            return text[: RESULT_EXCERPT_CHARS - 1] + "…"
        return text

    @admin.display(description="duration")
    def duration(self, task: Task) -> str:
        return graph.duration_text(task.started_at, task.finished_at) or "—"

    @admin.display(description="attempts")
    def attempts(self, task: Task) -> int:
        return task.attempt


class RunStepInline(_RunTaskInline):
    verbose_name = "step"
    verbose_name_plural = "steps (in the order they started)"
    fields = (
        "step",
        "type",
        "status",
        "attempts",
        "result_excerpt",
        "started_at",
        "finished_at",
        "duration",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Task]:
        return super().get_queryset(request).exclude(type=runs.COMPENSATION_TYPE)


class RunCompensationInline(_RunTaskInline):
    verbose_name = "compensation"
    verbose_name_plural = "compensations (in the order they started)"
    fields = (
        "step",
        "status",
        "attempts",
        "result_excerpt",
        "started_at",
        "finished_at",
        "duration",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Task]:
        return super().get_queryset(request).filter(type=runs.COMPENSATION_TYPE)


@admin.register(WorkflowRun)
class WorkflowRunAdmin(admin.ModelAdmin):
    list_display = ("short_id", "workflow", "status", "owner", "created_at", "finished_at")
    list_display_links = ("short_id",)
    list_filter = ("status", "workflow", "created_at")
    search_fields = ("=id",)
    date_hierarchy = "created_at"
    list_select_related = ("workflow", "owner")
    show_full_result_count = False
    actions = ["cancel_runs", "retry_runs"]
    inlines = [RunStepInline, RunCompensationInline]
    readonly_fields = (
        "id",
        "workflow",
        "version_number",
        "owner",
        "status",
        "error",
        "cancel_requested",
        "input",
        "created_at",
        "updated_at",
        "finished_at",
        "picture",
    )
    fieldsets = (
        (None, {"fields": ("id", "workflow", "version_number", "owner", "status", "error")}),
        ("Picture", {"fields": ("picture",)}),
        ("Input", {"fields": ("input", "cancel_requested")}),
        ("Times", {"fields": ("created_at", "updated_at", "finished_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowRun]:
        return super().get_queryset(request).select_related("workflow", "version", "owner")

    @admin.display(description="run", ordering="id")
    def short_id(self, run: WorkflowRun) -> str:
        return str(run.id)[:8]  # the full id is on the run's page and found by search

    @admin.display(description="version")
    def version_number(self, run: WorkflowRun) -> int:
        return run.version.version

    @admin.display(description="Step graph")
    def picture(self, run: WorkflowRun) -> SafeString:
        steps, compensations = selectors.run_steps(run)
        svg = graph.render(coordinator.graph_for(run), steps, compensations)
        # render() escapes every text it draws, so its output is safe to inline.
        return format_html(
            '<div class="qwg-picture" style="overflow-x: auto; max-width: 100%;">{}</div>',
            mark_safe(svg),  # noqa: S308
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs are started through the API, which validates their input

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # The change page is read-only; the status moves only through the actions.
        return super().has_change_permission(request, obj) and obj is None

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False  # a run's tasks are its audit trail

    @admin.action(
        description="Cancel selected runs (compensates completed steps)", permissions=["change"]
    )
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        by = request.user.get_username()
        done, refused = apply_each(queryset, lambda run: services.run_cancel(run=run, by=by))
        self.message_user(
            request,
            f"Cancelled: {done}; refused (already finished): {refused}.",
            outcome_level(refused),
        )

    @admin.action(description="Retry selected runs (FAILED)", permissions=["change"])
    def retry_runs(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        by = request.user.get_username()
        done, refused = apply_each(queryset, lambda run: services.run_retry(run=run, by=by))
        self.message_user(
            request, f"Retried: {done}; refused (not FAILED): {refused}.", outcome_level(refused)
        )


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    """The schedule's target and overlap; its timing is edited on the PeriodicTask page."""

    list_display = ("name", "owner", "overlap", "timing", "enabled", "created_at")
    search_fields = ("name", "=id")
    list_select_related = ("owner", "periodic_task")
    fields = ("id", "name", "owner", "target", "overlap", "timezone", "timing", "created_at")
    readonly_fields = ("id", "owner", "timezone", "timing", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # targets are validated by the API on write

    @admin.display(description="timing")
    def timing(self, obj: Schedule) -> SafeString:
        url = reverse("admin:django_celery_beat_periodictask_change", args=[obj.periodic_task_id])
        return format_html('<a href="{}">{}</a>', url, obj.periodic_task)

    @admin.display(boolean=True, description="enabled")
    def enabled(self, obj: Schedule) -> bool:
        return bool(obj.periodic_task.enabled)
