from __future__ import annotations

from typing import cast

import django_filters
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import FileResponse, HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from queueworker.api import CreateThrottle
from queueworker.db_router import ReplicaReadsMixin
from queueworker.errors import Gone, InvalidInput, InvalidTransition
from tasks_app import artifacts, selectors, services
from tasks_app.api.serializers import (
    NoInput,
    TaskBulkCreateInput,
    TaskBulkCreateOutput,
    TaskCreateInput,
    TaskDetailOutput,
    TaskLogOutput,
    TaskOutput,
    build_spec,
    bulk_items,
    validate_bulk_items,
)
from tasks_app.models import Task, TaskStatus

IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="The same key with the same body returns the first task (200); "
    "with another body, 409. Scoped to the caller, kept QW_IDEMPOTENCY_TTL_HOURS.",
)


class TaskFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=TaskStatus.choices)
    type = django_filters.CharFilter()
    parent = django_filters.UUIDFilter(field_name="parent_id")
    workflow_run = django_filters.UUIDFilter(field_name="workflow_run_id")
    schedule = django_filters.UUIDFilter(field_name="schedule_id")
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Task
        fields = [
            "status",
            "type",
            "parent",
            "workflow_run",
            "schedule",
            "created_after",
            "created_before",
        ]


class TaskViewSet(ReplicaReadsMixin, viewsets.GenericViewSet):
    """Tasks: create, list, inspect, cancel, retry. Every action is scoped to its caller."""

    filterset_class = TaskFilter
    ordering_fields = ["created_at", "priority"]
    ordering = ["-created_at"]
    throttle_classes = [CreateThrottle]
    throttle_scope = "create"
    # Retry starts tasks too, so it counts against the same rate (as does workflows' compensate).
    throttled_actions = ("create", "bulk", "retry")
    lookup_value_converter = "uuid"

    def get_queryset(self) -> QuerySet[Task]:
        return selectors.task_queryset(self.request.user).select_related("owner")

    def _by(self) -> str:
        return self.request.user.get_username()

    @extend_schema(
        request=TaskCreateInput,
        parameters=[IDEMPOTENCY_HEADER],
        responses={
            201: TaskDetailOutput,
            200: OpenApiResponse(TaskDetailOutput, description="Same idempotency key: the task."),
            409: OpenApiResponse(description="Idempotency key reused with another body."),
        },
    )
    def create(self, request: Request) -> Response:
        body = TaskCreateInput(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        key = _idempotency_key(request, body.validated_data.get("idempotency_key"))
        task, created = services.task_create(
            owner=cast(User, request.user), spec=body.to_spec(idempotency_key=key)
        )
        return Response(
            TaskDetailOutput(task, context={"created": created}).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
            headers={"Location": f"/api/tasks/{task.id}/"},
        )

    @extend_schema(request=TaskBulkCreateInput, responses={201: TaskBulkCreateOutput})
    @action(detail=False, methods=["post"])
    def bulk(self, request: Request) -> Response:
        """Create up to ``QW_BULK_MAX`` tasks in one transaction: all valid or none created."""
        items = bulk_items(request.data)
        if items is None:  # not the plain shape: the serializer says what is wrong with it
            body = TaskBulkCreateInput(data=request.data, context={"request": request})
            body.is_valid(raise_exception=True)
            specs = [build_spec(item) for item in body.validated_data["tasks"]]
        else:
            specs = validate_bulk_items(items, request=request)
        tasks = services.task_bulk_create(owner=cast(User, request.user), specs=specs)
        return Response({"ids": [str(t.id) for t in tasks]}, status=status.HTTP_201_CREATED)

    @extend_schema(responses=TaskOutput(many=True))
    def list(self, request: Request) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        return self.get_paginated_response(TaskOutput(page, many=True).data)

    @extend_schema(responses=TaskDetailOutput)
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(TaskDetailOutput(self.get_object()).data)

    @extend_schema(responses=TaskLogOutput(many=True))
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def logs(self, request: Request, pk: str | None = None) -> Response:
        """The task's audit trail, oldest first."""
        return Response(TaskLogOutput(selectors.task_logs(self.get_object()), many=True).data)

    @extend_schema(
        responses={
            # Each media type needs a schema: drf-spectacular fails on one without (KeyError).
            (200, "application/json"): OpenApiResponse(
                OpenApiTypes.ANY,
                description="The result, when it is inline (or has no stored rows).",
            ),
            (200, "application/x-ndjson"): OpenApiResponse(
                OpenApiTypes.STR,
                description="Stored rows, streamed (also text/csv or application/json, by the "
                "task's output_format).",
            ),
            409: OpenApiResponse(description="The task has not COMPLETED."),
            410: OpenApiResponse(description="The stored result has expired."),
        },
        parameters=[
            OpenApiParameter(
                "part",
                str,
                enum=["rows", "invalid"],
                description="`invalid`: the rows an `on_invalid: collect` set aside.",
            )
        ],
    )
    @action(detail=True, methods=["get"], filter_backends=[])
    def result(self, request: Request, pk: str | None = None) -> HttpResponseBase:
        """The task's result; a result stored as an artifact is streamed."""
        task = self.get_object()
        if task.status != TaskStatus.COMPLETED:
            raise InvalidTransition({"detail": f"The task is {task.status}: no result yet."})
        part = request.query_params.get("part", "rows")
        if part not in ("rows", "invalid"):
            raise InvalidInput({"part": ["One of rows, invalid."]})
        stored = selectors.stored_result(task, part=part)
        if stored is None:
            return Response(task.result)
        name, content_type, filename = stored
        try:
            handle = artifacts.storage().open(name, "rb")
        except FileNotFoundError:
            raise Gone({"detail": "The stored result has expired."}) from None
        return FileResponse(handle, content_type=content_type, filename=filename)

    @extend_schema(
        request=None,
        responses={
            200: OpenApiResponse(TaskDetailOutput, description="Cancelled."),
            202: OpenApiResponse(TaskDetailOutput, description="Running: cancel requested."),
            409: OpenApiResponse(description="The task has finished."),
        },
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        NoInput(data=request.data).is_valid(raise_exception=True)
        result = services.task_cancel(task=self.get_object(), by=self._by())
        return Response(
            TaskDetailOutput(result.task).data,
            status=status.HTTP_202_ACCEPTED if result.requested else status.HTTP_200_OK,
        )

    @extend_schema(
        request=None,
        responses={
            202: TaskDetailOutput,
            409: OpenApiResponse(description="Only FAILED or CANCELLED tasks can be retried."),
        },
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """FAILED or CANCELLED → PENDING; retries start again from 0."""
        NoInput(data=request.data).is_valid(raise_exception=True)
        task = services.task_retry(task=self.get_object(), by=self._by())
        return Response(TaskDetailOutput(task).data, status=status.HTTP_202_ACCEPTED)


def _idempotency_key(request: Request, from_body: str | None) -> str | None:
    header = request.headers.get("Idempotency-Key")
    if header is not None:
        header = header.strip()
        if not header or len(header) > 255:
            raise serializers.ValidationError({"Idempotency-Key": ["Must be 1 to 255 characters."]})
        if from_body and from_body != header:
            raise serializers.ValidationError(
                {"idempotency_key": ["Differs from the Idempotency-Key header."]}
            )
        return header
    return from_body or None
