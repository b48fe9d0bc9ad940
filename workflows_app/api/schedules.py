"""The schedules API (docs/schedules.md): validation, output, and the ViewSet."""

from __future__ import annotations

import uuid
from typing import Any, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import django_filters
from django.contrib.auth.models import User
from django.db.models import Count, Max, Q, QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from queueworker.api import CreateThrottle
from tasks_app.api.serializers import NoInput, StrictSerializer, TaskCreateInput
from workflows_app import cron, schedules, selectors
from workflows_app import services as workflow_services
from workflows_app.models import Overlap, Schedule

MIN_INTERVAL_S = 1
MAX_INTERVAL_S = 366 * 24 * 3600
TIMING_FIELDS = ("cron", "interval_s", "run_at")


def _user_of(serializer: serializers.Serializer) -> Any:
    request = serializer.context.get("request")
    return getattr(request, "user", None)


def check_target(value: Any, user: Any) -> dict[str, Any]:
    """The target checked exactly as task create or run start checks it."""
    if not isinstance(value, dict) or len({"task", "workflow"} & set(value)) != 1:
        raise serializers.ValidationError(
            "Give {task: {type, payload, …}} or {workflow: id, input}."
        )
    if "task" in value:
        unknown = sorted(set(value) - {"task"})
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        body = TaskCreateInput(data=value["task"], context={"owner": user})
        if not body.is_valid():
            raise serializers.ValidationError({"task": body.errors})
        fixed = sorted({"idempotency_key", "scheduled_at"} & set(value["task"]))
        if fixed:
            raise serializers.ValidationError(
                {"task": {name: ["Not allowed in a schedule's task."] for name in fixed}}
            )
        return {"task": dict(value["task"])}
    unknown = sorted(set(value) - {"workflow", "input"})
    if unknown:
        raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
    try:
        workflow_id = uuid.UUID(str(value["workflow"]))
    except ValueError:
        raise serializers.ValidationError({"workflow": ["Must be a workflow id."]}) from None
    workflow = selectors.workflow_queryset(user).filter(pk=workflow_id).first()
    if workflow is None:
        raise serializers.ValidationError({"workflow": [f"No workflow {workflow_id}."]})
    if not workflow.is_active:
        raise serializers.ValidationError(
            {"workflow": [f"Workflow '{workflow.name}' is inactive."]}
        )
    run_input = value.get("input", {})
    version = workflow.versions.order_by("-version").first()
    assert version is not None
    problems = workflow_services.run_input_problems(version, run_input)
    if problems:
        raise serializers.ValidationError({"input": problems})
    return {"workflow": str(workflow_id), "input": run_input}


class ScheduleInput(StrictSerializer):
    name = serializers.CharField(max_length=200)
    cron = serializers.CharField(
        required=False, max_length=200, help_text="Five fields: minute hour day month weekday."
    )
    interval_s = serializers.IntegerField(
        required=False, min_value=MIN_INTERVAL_S, max_value=MAX_INTERVAL_S
    )
    run_at = serializers.DateTimeField(required=False, help_text="A one-off fire at this time.")
    timezone = serializers.CharField(required=False, default="UTC", max_length=64)
    enabled = serializers.BooleanField(required=False, default=True)
    start_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    overlap = serializers.ChoiceField(choices=Overlap.choices, required=False, default="allow")
    target = serializers.JSONField(help_text="{task: {type, payload, …}} or {workflow: id, input}")

    def validate_cron(self, value: str) -> str:
        try:
            parsed = cron.parse(value)
        except cron.CronError as exc:
            raise serializers.ValidationError(str(exc)) from None
        if cron.next_fire(parsed, ZoneInfo("UTC"), timezone.now()) is None:
            raise serializers.ValidationError("This expression never fires.")
        return " ".join(parsed.fields)

    def validate_timezone(self, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise serializers.ValidationError(f"Unknown IANA timezone '{value}'.") from None
        return value

    def validate_target(self, value: Any) -> dict[str, Any]:
        return check_target(value, _user_of(self))

    def _timing(self, attrs: dict[str, Any], required: bool) -> schedules.Timing | None:
        given = [name for name in TIMING_FIELDS if attrs.get(name) is not None]
        if len(given) > 1:
            raise serializers.ValidationError(
                {given[1]: [f"Give one of {', '.join(TIMING_FIELDS)}."]}
            )
        if not given:
            if required:
                raise serializers.ValidationError(
                    {"cron": [f"Give one of {', '.join(TIMING_FIELDS)}."]}
                )
            return None
        return schedules.Timing(**{given[0]: attrs.pop(given[0])})

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs["timing"] = self._timing(attrs, required=not self.partial)
        start, expires = attrs.get("start_at"), attrs.get("expires_at")
        if start is not None and expires is not None and expires <= start:
            raise serializers.ValidationError({"expires_at": ["Must be after start_at."]})
        return attrs


class ScheduleOutput(serializers.Serializer):
    id = serializers.UUIDField(read_only=True)
    name = serializers.CharField(read_only=True)
    owner = serializers.CharField(source="owner.get_username", read_only=True)
    cron = serializers.CharField(allow_null=True, read_only=True)
    interval_s = serializers.IntegerField(allow_null=True, read_only=True)
    run_at = serializers.DateTimeField(allow_null=True, read_only=True)
    timezone = serializers.CharField(read_only=True)
    enabled = serializers.BooleanField(source="periodic_task.enabled", read_only=True)
    start_at = serializers.DateTimeField(
        source="periodic_task.start_time", allow_null=True, read_only=True
    )
    expires_at = serializers.DateTimeField(
        source="periodic_task.expires", allow_null=True, read_only=True
    )
    overlap = serializers.CharField(read_only=True)
    target = serializers.JSONField(read_only=True)
    last_run_at = serializers.DateTimeField(allow_null=True, read_only=True)
    next_run_at = serializers.DateTimeField(allow_null=True, read_only=True)
    total_run_count = serializers.IntegerField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)

    def to_representation(self, instance: Any) -> Any:
        timing = schedules.timing_of(instance)
        for key, value in timing.items():
            setattr(instance, key, value)
        instance.next_run_at = schedules.next_run_at(instance)
        return super().to_representation(instance)


class TriggerOutput(serializers.Serializer):
    task = serializers.UUIDField(allow_null=True)
    run = serializers.UUIDField(allow_null=True)
    error = serializers.CharField(allow_blank=True)


def schedule_queryset(user: Any) -> QuerySet[Schedule]:
    qs = Schedule.objects.select_related(
        "owner",
        "periodic_task",
        "periodic_task__crontab",
        "periodic_task__interval",
        "periodic_task__clocked",
    ).annotate(
        last_run_at=Max("fires__fired_at", filter=Q(fires__skipped=False)),
        total_run_count=Count("fires", filter=Q(fires__skipped=False)),
    )
    if not getattr(user, "is_staff", False):
        qs = qs.filter(owner_id=user.pk)
    return qs


class ScheduleFilter(django_filters.FilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")
    enabled = django_filters.BooleanFilter(field_name="periodic_task__enabled")

    class Meta:
        model = Schedule
        fields = ["name", "enabled"]


class ScheduleViewSet(viewsets.GenericViewSet):
    """Schedules that create a task or start a workflow run, on django-celery-beat."""

    filterset_class = ScheduleFilter
    ordering_fields = ["created_at", "name"]
    ordering = ["-created_at"]
    lookup_value_converter = "uuid"
    throttle_classes = [CreateThrottle]
    throttle_scope = "create"  # a manual fire creates a task or a run (QW_THROTTLE_CREATE)
    throttled_actions = ("trigger",)

    def get_queryset(self) -> QuerySet[Schedule]:
        return schedule_queryset(self.request.user)

    def _user(self) -> User:
        return cast(User, self.request.user)

    @extend_schema(request=ScheduleInput, responses={201: ScheduleOutput})
    def create(self, request: Request) -> Response:
        body = ScheduleInput(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        schedule = schedules.schedule_create(
            owner=self._user(),
            name=data["name"],
            timing=data["timing"],
            timezone_name=data["timezone"],
            target=data["target"],
            overlap=data["overlap"],
            enabled=data["enabled"],
            start_at=data["start_at"],
            expires_at=data["expires_at"],
        )
        return Response(
            ScheduleOutput(self.get_queryset().get(pk=schedule.pk)).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/schedules/{schedule.pk}/"},
        )

    @extend_schema(responses=ScheduleOutput(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(ScheduleOutput(page, many=True).data)

    @extend_schema(responses=ScheduleOutput)
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(ScheduleOutput(self.get_object()).data)

    @extend_schema(request=ScheduleInput, responses={200: ScheduleOutput})
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        schedule = self.get_object()
        body = ScheduleInput(data=request.data, partial=True, context={"request": request})
        body.is_valid(raise_exception=True)
        changes = {k: v for k, v in body.validated_data.items() if k != "timing"}
        if body.validated_data.get("timing") is not None:
            changes["timing"] = body.validated_data["timing"]
        schedules.schedule_update(schedule=schedule, changes=changes)
        return Response(ScheduleOutput(self.get_queryset().get(pk=schedule.pk)).data)

    @extend_schema(responses={204: OpenApiResponse(description="Deleted.")})
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        schedules.schedule_delete(schedule=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={202: TriggerOutput})
    @action(detail=True, methods=["post"], filter_backends=[])
    def trigger(self, request: Request, pk: str | None = None) -> Response:
        """Fire now (a manual fire: no slot dedupe, no overlap rule)."""
        NoInput(data=request.data).is_valid(raise_exception=True)
        fire = schedules.schedule_fire(self.get_object(), timezone.now(), manual=True)
        assert fire is not None
        return Response(
            TriggerOutput({"task": fire.task_id, "run": fire.run_id, "error": fire.error}).data,
            status=status.HTTP_202_ACCEPTED,
        )
