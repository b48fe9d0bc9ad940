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

from workflows_app import selectors, services
from workflows_app.api.serializers import (
    WorkflowCreateInput,
    WorkflowOutput,
    WorkflowUpdateInput,
    WorkflowVersionOutput,
)
from workflows_app.models import Workflow


class WorkflowFilter(django_filters.FilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")
    is_active = django_filters.BooleanFilter()

    class Meta:
        model = Workflow
        fields = ["name", "is_active"]


class WorkflowViewSet(viewsets.GenericViewSet):
    """Workflow definitions, validated on write; a changed definition adds a version."""

    filterset_class = WorkflowFilter
    ordering_fields = ["created_at", "name"]
    ordering = ["-created_at"]
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

    @extend_schema(responses=WorkflowVersionOutput(many=True))
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def versions(self, request: Request, pk: str | None = None) -> Response:
        """Every version of the definition, newest first."""
        versions = selectors.workflow_versions(self.get_object()).select_related("created_by")
        return Response(WorkflowVersionOutput(versions, many=True).data)
