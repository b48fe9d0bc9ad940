from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from workflows_app.models import Workflow, WorkflowVersion


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
