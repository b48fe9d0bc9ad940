"""Dead letters (docs/api.md): FAILED tasks with their failure class, and their redrive."""

from __future__ import annotations

from typing import Any

import amqp.exceptions
import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from queueworker import broker
from tasks_app import selectors, services
from tasks_app.api.serializers import (
    BoundedListField,
    StrictSerializer,
    TaskOutput,
    check_payload,
)
from tasks_app.models import DeadLetterMessage, FailureClass, Task


class DeadLetterFilter(django_filters.FilterSet):
    failure_class = django_filters.MultipleChoiceFilter(choices=FailureClass.choices)
    type = django_filters.CharFilter()
    failed_after = django_filters.IsoDateTimeFilter(field_name="finished_at", lookup_expr="gte")

    class Meta:
        model = Task
        fields = ["failure_class", "type", "failed_after"]


class RedriveFilterInput(StrictSerializer):
    failure_class = BoundedListField(
        child=serializers.ChoiceField(choices=FailureClass.choices),
        required=False,
        max_length=len(FailureClass.choices),
    )
    type = serializers.CharField(required=False)
    failed_after = serializers.DateTimeField(required=False)


class RedriveInput(StrictSerializer):
    task_ids = BoundedListField(
        child=serializers.UUIDField(), required=False, allow_empty=False, max_length=10_000
    )
    filter = RedriveFilterInput(
        required=False,
        help_text="Every dead letter matching it (failure_class, type, failed_after).",
    )
    all = serializers.BooleanField(required=False, default=False)
    payload = serializers.JSONField(
        required=False,
        help_text="Replaces the payload of every redriven task (audited); checked as at create.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        given = [key for key in ("task_ids", "filter", "all") if attrs.get(key)]
        if len(given) != 1:
            raise serializers.ValidationError(
                {"task_ids": ["Give exactly one of task_ids, filter, or all: true."]}
            )
        return attrs


class RedriveOutput(serializers.Serializer):
    redriven = serializers.IntegerField()


class DeadLetterViewSet(viewsets.GenericViewSet):
    """Tasks that failed for good, with their ``failure_class`` (each user their own; staff all);
    redrive (staff only) sends them back."""

    filterset_class = DeadLetterFilter
    ordering_fields = ["finished_at"]
    ordering = ["-finished_at"]

    def get_queryset(self) -> QuerySet[Task]:
        return selectors.dead_letter_queryset(self.request.user).select_related("owner")

    @extend_schema(responses=TaskOutput(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(TaskOutput(page, many=True).data)

    @extend_schema(
        request=RedriveInput,
        responses={202: RedriveOutput, 403: OpenApiResponse(description="Not staff.")},
    )
    @action(detail=False, methods=["post"], filter_backends=[], permission_classes=[IsAdminUser])
    def redrive(self, request: Request) -> Response:
        body = RedriveInput(data=request.data)
        body.is_valid(raise_exception=True)
        queryset = self.get_queryset()
        data = body.validated_data
        if data.get("task_ids"):
            queryset = queryset.filter(pk__in=data["task_ids"])
        elif data.get("filter"):
            where = data["filter"]
            if where.get("failure_class"):
                queryset = queryset.filter(failure_class__in=where["failure_class"])
            if where.get("type"):
                queryset = queryset.filter(type=where["type"])
            if where.get("failed_after"):
                queryset = queryset.filter(finished_at__gte=where["failed_after"])
        tasks = list(queryset)
        payload = data.get("payload")
        if payload is not None:
            _check_new_payload(tasks, payload)
        requeued = services.dead_letter_redrive(
            tasks=tasks, by=request.user.get_username(), payload=payload
        )
        return Response({"redriven": len(requeued)}, status=status.HTTP_202_ACCEPTED)


def _check_new_payload(tasks: list[Task], payload: Any) -> None:
    """A replacement payload passes the create rules for every task it is given to: each task's
    type, its own ``timeout_s`` and its owner (whose artifacts and tasks it may reference)."""
    seen: set[tuple[str, int, Any]] = set()
    for task in tasks:
        key = (task.type, task.timeout_s, task.owner_id)
        if key not in seen:
            seen.add(key)
            check_payload(task.type, payload, timeout_s=task.timeout_s, owner=task.owner)


class QueueOutput(serializers.Serializer):
    name = serializers.CharField()
    messages = serializers.IntegerField(allow_null=True, help_text="Ready messages.")
    messages_unacked = serializers.IntegerField(
        allow_null=True, help_text="Null unless QW_RABBITMQ_MANAGEMENT_URL is set."
    )
    consumers = serializers.IntegerField(allow_null=True)
    overloaded = serializers.BooleanField(help_text="More than QW_QUEUE_OVERLOAD_THRESHOLD.")
    error = serializers.CharField(allow_blank=True)


class QueueListView(APIView):
    """Every declared queue, as the broker sees it now."""

    @extend_schema(responses=QueueOutput(many=True))
    def get(self, request: Request) -> Response:
        stats = broker.queue_stats()
        rows = [
            {
                "name": s.name,
                "messages": s.messages,
                "messages_unacked": s.messages_unacked,
                "consumers": s.consumers,
                "overloaded": s.overloaded,
                "error": s.error,
            }
            for s in stats
        ]
        return Response(QueueOutput(rows, many=True).data)


class PurgeInput(StrictSerializer):
    confirm = serializers.CharField(help_text="The queue's name again, to confirm.")


class PurgeOutput(serializers.Serializer):
    purged = serializers.IntegerField()


class QueuePurgeView(APIView):
    """Drop a queue's messages (staff only). Tasks stay in the database: their wake-ups are
    gone, and the dispatcher republishes what still waits once the queue is empty for
    QW_LOST_MESSAGE_GRACE_S (10 s); cancel tasks to drop work."""

    permission_classes = [IsAdminUser]

    @extend_schema(
        request=PurgeInput,
        responses={200: PurgeOutput, 400: OpenApiResponse(description="confirm differs.")},
    )
    def post(self, request: Request, name: str) -> Response:
        if name not in broker.declared_queue_names():
            raise NotFound(f"No declared queue '{name}'.")
        body = PurgeInput(data=request.data)
        body.is_valid(raise_exception=True)
        if body.validated_data["confirm"] != name:
            raise serializers.ValidationError({"confirm": [f"Must be '{name}'."]})
        try:
            purged = broker.purge(name)
        except amqp.exceptions.NotFound:
            purged = 0  # declared here, but no worker has declared it on the broker yet
        return Response({"purged": purged})


class DeadLetterMessageOutput(serializers.ModelSerializer):
    class Meta:
        model = DeadLetterMessage
        fields = [
            "id",
            "failure_class",
            "reason",
            "queue",
            "content_type",
            "task_name",
            "task_id",
            "headers",
            "body_excerpt",
            "created_at",
        ]
        read_only_fields = fields


class DeadLetterMessageViewSet(viewsets.GenericViewSet):
    """Messages the application refused (not JSON, unknown task name, no such task), recorded
    from tasks.dead_letter. Staff only: a message has no owner."""

    permission_classes = [IsAdminUser]
    filter_backends: list[Any] = []

    def get_queryset(self) -> QuerySet[DeadLetterMessage]:
        return DeadLetterMessage.objects.all()

    @extend_schema(responses=DeadLetterMessageOutput(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(DeadLetterMessageOutput(page, many=True).data)
