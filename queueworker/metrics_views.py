"""``GET /api/metrics/`` (JSON, the caller's scope) and ``GET /metrics`` (Prometheus).

The figures come from what the apps register with ``queueworker.metrics``; the JSON answer's
shape is documented here, as a part of the API's schema.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from queueworker import metrics
from queueworker.db_router import ReplicaReadsMixin


class TaskCountsOutput(serializers.Serializer):
    total = serializers.IntegerField()
    by_status = serializers.DictField(child=serializers.IntegerField(), help_text="Every status.")
    by_type = serializers.DictField(child=serializers.IntegerField())
    by_type_status = serializers.DictField(
        child=serializers.DictField(child=serializers.IntegerField()),
        help_text="{type: {status: count}}, every status.",
    )


class WindowOutput(serializers.Serializer):
    window_s = serializers.IntegerField()
    finished = serializers.IntegerField(help_text="Reached COMPLETED, FAILED or CANCELLED.")
    completed = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()
    retries = serializers.IntegerField(help_text="Retries of the tasks that finished.")
    throughput_per_s = serializers.FloatField(help_text="completed / window_s.")
    error_rate = serializers.FloatField(allow_null=True, help_text="failed / finished.")
    retry_rate = serializers.FloatField(allow_null=True, help_text="retries / finished.")


class WindowsOutput(serializers.Serializer):
    def get_fields(self) -> dict[str, serializers.Field]:
        return {key: WindowOutput() for key in ("1m", "5m", "15m")}


class PercentilesOutput(serializers.Serializer):
    count = serializers.IntegerField()
    p50 = serializers.FloatField()
    p95 = serializers.FloatField()
    p99 = serializers.FloatField()


class DurationsOutput(serializers.Serializer):
    window_s = serializers.IntegerField()
    by_type = serializers.DictField(
        child=PercentilesOutput(),
        help_text="finished_at - started_at in seconds of the tasks COMPLETED in the window.",
    )


class DeadLettersOutput(serializers.Serializer):
    total = serializers.IntegerField()
    by_failure_class = serializers.DictField(child=serializers.IntegerField())


class ByStatusOutput(serializers.Serializer):
    by_status = serializers.DictField(child=serializers.IntegerField())


class MetricsOutput(serializers.Serializer):
    scope = serializers.ChoiceField(
        choices=["all", "own"], help_text="own: the caller's tasks and runs; all: staff."
    )
    generated_at = serializers.DateTimeField()
    tasks = TaskCountsOutput()
    windows = WindowsOutput(help_text="The last 1, 5 and 15 minutes, by finished_at.")
    durations = DurationsOutput()
    dead_letters = DeadLettersOutput(
        help_text="FAILED tasks by failure_class; for staff, with the messages workers refused "
        "(invalid_message, poison_message)."
    )
    oldest_pending_age_s = serializers.FloatField(
        help_text="How long the oldest due PENDING/RETRYING task has waited; 0 when none."
    )
    workflow_runs = ByStatusOutput()
    compensations = ByStatusOutput(help_text="COMPENSATION tasks of workflow runs.")


class MetricsView(ReplicaReadsMixin, APIView):
    """Task and workflow figures: the caller's own, or everyone's for staff."""

    @extend_schema(responses=MetricsOutput)
    def get(self, request: Request) -> Response:
        return Response(MetricsOutput(metrics.summary(request.user)).data)


@never_cache
@require_safe
def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition; ``Authorization: Bearer <QW_METRICS_TOKEN>`` when that is set."""
    if not metrics.token_accepted(request.headers.get("Authorization", "")):
        response = HttpResponse(
            "401 Unauthorized: send Authorization: Bearer <QW_METRICS_TOKEN>\n",
            status=401,
            content_type="text/plain; charset=utf-8",
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body, content_type = metrics.exposition(request.headers.get("Accept", ""))
    return HttpResponse(body, content_type=content_type)
