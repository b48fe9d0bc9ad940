from __future__ import annotations

from typing import Any, cast

import django_filters
from django.contrib.auth.models import User
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from queueworker.api import CreateThrottle
from queueworker.db_router import ReplicaReadsMixin
from tasks_app import selectors as task_selectors
from tasks_app.api.serializers import NoInput, TaskDetailOutput
from tasks_app.models import Task
from workflows_app import selectors, services
from workflows_app.api.serializers import (
    CompensateInput,
    RunDetailOutput,
    RunOutput,
    RunStartInput,
    WorkflowCreateInput,
    WorkflowOutput,
    WorkflowUpdateInput,
    WorkflowVersionOutput,
)
from workflows_app.models import RunStatus, Workflow, WorkflowRun


class WorkflowFilter(django_filters.FilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")
    is_active = django_filters.BooleanFilter()

    class Meta:
        model = Workflow
        fields = ["name", "is_active"]


class WorkflowViewSet(ReplicaReadsMixin, viewsets.GenericViewSet):
    """Workflow definitions, validated on write; a changed definition adds a version."""

    filterset_class = WorkflowFilter
    ordering_fields = ["created_at", "name"]
    ordering = ["-created_at"]
    throttle_classes = [CreateThrottle]
    throttle_scope = "create"  # shared with task creation (QW_THROTTLE_CREATE)
    throttled_actions = ("runs",)
    lookup_value_converter = "uuid"

    def get_queryset(self) -> QuerySet[Workflow]:
        return selectors.workflow_queryset(self.request.user)

    def _user(self) -> User:
        return cast(User, self.request.user)

    def _current(self, pk: Any) -> Workflow:
        return self.get_queryset().get(pk=pk)

    @extend_schema(request=WorkflowCreateInput, responses={201: WorkflowOutput})
    def create(self, request: Request) -> Response:
        body = WorkflowCreateInput(data=request.data)
        body.is_valid(raise_exception=True)
        workflow = services.workflow_create(owner=self._user(), **body.validated_data)
        return Response(
            WorkflowOutput(self._current(workflow.pk)).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/workflows/{workflow.pk}/"},
        )

    @extend_schema(responses=WorkflowOutput(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(WorkflowOutput(page, many=True).data)

    @extend_schema(responses=WorkflowOutput)
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(WorkflowOutput(self.get_object()).data)

    @extend_schema(request=WorkflowUpdateInput, responses={200: WorkflowOutput})
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        workflow = self.get_object()
        body = WorkflowUpdateInput(data=request.data)
        body.is_valid(raise_exception=True)
        services.workflow_update(workflow=workflow, by=self._user(), **body.validated_data)
        return Response(WorkflowOutput(self._current(workflow.pk)).data)

    @extend_schema(responses={204: OpenApiResponse(description="Deleted.")})
    def destroy(self, request: Request, pk: str | None = None) -> Response:
        services.workflow_delete(workflow=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=RunStartInput,
        responses={
            201: RunDetailOutput,
            400: OpenApiResponse(description="The input fails the workflow's input_schema."),
            409: OpenApiResponse(description="The workflow is inactive."),
        },
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def runs(self, request: Request, pk: str | None = None) -> Response:
        """Start a run of the latest version with ``{input}``."""
        body = RunStartInput(data=request.data)
        body.is_valid(raise_exception=True)
        run = services.run_start(
            workflow=self.get_object(), owner=self._user(), input=body.validated_data["input"]
        )
        return Response(
            RunDetailOutput(run).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/workflow-runs/{run.pk}/"},
        )

    @extend_schema(responses=WorkflowVersionOutput(many=True))
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def versions(self, request: Request, pk: str | None = None) -> Response:
        """Every version of the definition, newest first."""
        versions = selectors.workflow_versions(self.get_object()).select_related("created_by")
        return Response(WorkflowVersionOutput(versions, many=True).data)


class RunFilter(django_filters.FilterSet):
    workflow = django_filters.UUIDFilter(field_name="workflow_id")
    schedule = django_filters.UUIDFilter(field_name="schedule_id")
    status = django_filters.MultipleChoiceFilter(choices=RunStatus.choices)
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = WorkflowRun
        fields = ["workflow", "schedule", "status", "created_after", "created_before"]


class WorkflowRunViewSet(ReplicaReadsMixin, viewsets.GenericViewSet):
    """Workflow runs: their steps and compensations, cancel and retry."""

    filterset_class = RunFilter
    ordering_fields = ["created_at"]
    ordering = ["-created_at"]
    lookup_value_converter = "uuid"
    throttle_classes = [CreateThrottle]
    throttle_scope = "create"  # a retry starts tasks again (QW_THROTTLE_CREATE)
    throttled_actions = ("retry",)

    def get_queryset(self) -> QuerySet[WorkflowRun]:
        return selectors.run_queryset(self.request.user)

    @extend_schema(responses=RunOutput(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(RunOutput(page, many=True).data)

    @extend_schema(responses=RunDetailOutput)
    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        return Response(RunDetailOutput(self.get_object()).data)

    @extend_schema(
        request=None,
        responses={202: RunDetailOutput, 409: OpenApiResponse(description="Already finished.")},
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Stop the run, compensate what completed, end CANCELLED."""
        NoInput(data=request.data).is_valid(raise_exception=True)
        run = services.run_cancel(run=self.get_object(), by=request.user.get_username())
        return Response(RunDetailOutput(run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=None,
        responses={202: RunDetailOutput, 409: OpenApiResponse(description="Not FAILED.")},
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """A FAILED run: re-run the failed compensation, or resume from the failed step."""
        NoInput(data=request.data).is_valid(raise_exception=True)
        run = services.run_retry(run=self.get_object(), by=request.user.get_username())
        return Response(RunDetailOutput(run).data, status=status.HTTP_202_ACCEPTED)


class TaskCompensateViewSet(ReplicaReadsMixin, viewsets.GenericViewSet):
    """``POST /api/tasks/{id}/compensate/``: a saga's undo, applied to one task by hand.

    Compensation is workflows' business (a step's declared compensation, the run's log), so the
    view lives here while the route stays at the task's path; the engine's ``TaskViewSet``
    answers every other task route. It scopes tasks to the caller as that view does (another
    caller's task is a 404) and counts against the same create rate.
    """

    throttle_classes = [CreateThrottle]
    throttle_scope = "create"
    throttled_actions = ("compensate",)
    lookup_value_converter = "uuid"

    def get_queryset(self) -> QuerySet[Task]:
        return task_selectors.task_queryset(self.request.user).select_related("owner")

    @extend_schema(
        request=CompensateInput,
        responses={
            201: TaskDetailOutput,
            400: OpenApiResponse(description="No declared compensation and no action given."),
            409: OpenApiResponse(description="Not COMPLETED, or already compensated."),
        },
    )
    @action(detail=True, methods=["post"], filter_backends=[])
    def compensate(self, request: Request, pk: str | None = None) -> Response:
        """Undo a COMPLETED task: its step's declared compensation, or ``{action}``."""
        body = CompensateInput(data=request.data)
        body.is_valid(raise_exception=True)
        created = services.task_compensate(
            task=self.get_object(),
            by=request.user.get_username(),
            action=body.validated_data.get("action"),
        )
        return Response(
            TaskDetailOutput(created, context={"created": True}).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": f"/api/tasks/{created.id}/"},
        )
