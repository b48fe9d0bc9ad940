"""Dead letters (DESIGN §5, §7): FAILED tasks with their failure class, and their redrive."""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from tasks_app import selectors, services
from tasks_app.api.serializers import StrictSerializer, TaskOutput
from tasks_app.models import FailureClass, Task


class DeadLetterFilter(django_filters.FilterSet):
    failure_class = django_filters.MultipleChoiceFilter(choices=FailureClass.choices)
    type = django_filters.CharFilter()
    failed_after = django_filters.IsoDateTimeFilter(field_name="finished_at", lookup_expr="gte")

    class Meta:
        model = Task
        fields = ["failure_class", "type", "failed_after"]


class RedriveInput(StrictSerializer):
    task_ids = serializers.ListField(
        child=serializers.UUIDField(), required=False, allow_empty=False, max_length=10_000
    )
    all = serializers.BooleanField(required=False, default=False)
    payload = serializers.JSONField(
        required=False, help_text="Replaces the payload of every redriven task (audited)."
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs.get("task_ids")) == bool(attrs.get("all")):
            raise serializers.ValidationError(
                {"task_ids": ["Give task_ids, or all: true (not both)."]}
            )
        return attrs


class RedriveOutput(serializers.Serializer):
    redriven = serializers.IntegerField()


class DeadLetterViewSet(viewsets.GenericViewSet):
    """Tasks that failed for good, with their ``failure_class``; redrive sends them back."""

    filterset_class = DeadLetterFilter
    ordering_fields = ["finished_at"]
    ordering = ["-finished_at"]

    def get_queryset(self) -> QuerySet[Task]:
        return selectors.dead_letter_queryset(self.request.user).select_related("owner")

    @extend_schema(responses=TaskOutput(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(TaskOutput(page, many=True).data)

    @extend_schema(request=RedriveInput, responses={202: RedriveOutput})
    @action(detail=False, methods=["post"], filter_backends=[])
    def redrive(self, request: Request) -> Response:
        body = RedriveInput(data=request.data)
        body.is_valid(raise_exception=True)
        queryset = self.get_queryset()
        if not body.validated_data.get("all"):
            queryset = queryset.filter(pk__in=body.validated_data["task_ids"])
        requeued = services.dead_letter_redrive(
            tasks=list(queryset),
            by=request.user.get_username(),
            payload=body.validated_data.get("payload"),
        )
        return Response({"redriven": len(requeued)}, status=status.HTTP_202_ACCEPTED)
