from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from queueworker.redaction import RedactedFields
from tasks_app import selectors

# Re-exported: the API's modules and tests take the create rules from here.
from tasks_app.api.create_input import MAX_DELAY_MS as MAX_DELAY_MS
from tasks_app.api.create_input import StrictSerializer as StrictSerializer
from tasks_app.api.create_input import TaskCreateRules
from tasks_app.api.create_input import check_payload as check_payload
from tasks_app.api.create_input import payload_errors as payload_errors
from tasks_app.handlers.registry import registry
from tasks_app.models import Task, TaskLog, TaskStatus
from tasks_app.services import TaskSpec, canonical_hash
from tasks_app.services import build_spec as build_spec


class BoundedListField(serializers.ListField):
    """A ``ListField`` that counts before it checks the items: DRF checks every item first,
    so a 1 MiB list of bad items cost seconds and answered one error per item."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, list) and self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class NoInput(StrictSerializer):
    """The body of a command that takes none: nothing, or ``{}``. Anything else is a 400 (a
    415 if it is not JSON), so that a malformed request never acts."""


class TaskCreateInput(TaskCreateRules):
    """A create body as the API takes it (``POST /api/tasks/``)."""

    def to_spec(self, *, idempotency_key: str | None = None) -> TaskSpec:
        return build_spec(
            self.validated_data,
            idempotency_key=idempotency_key,
            request_hash=canonical_hash(self.initial_data) if idempotency_key else "",
        )


class BulkItemInput(TaskCreateInput):
    def validate_idempotency_key(self, value: str | None) -> str | None:
        if value:
            raise serializers.ValidationError("Not supported in bulk create.")
        return value


class TaskBulkCreateInput(StrictSerializer):
    tasks = BulkItemInput(many=True, allow_empty=False)

    def to_internal_value(self, data: Any) -> Any:
        # Counted before any item is validated: a 1 MiB body of 300,000 `{}` items otherwise
        # cost seconds of CPU and answered one error per item.
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if isinstance(tasks, list) and len(tasks) > settings.QW_BULK_MAX:
            raise serializers.ValidationError(
                {
                    "tasks": [
                        f"At most {settings.QW_BULK_MAX} tasks per call (QW_BULK_MAX), "
                        f"got {len(tasks)}."
                    ]
                }
            )
        return super().to_internal_value(data)


# The bulk body's items: the fields an item may have, and the bounds of its plain numbers.
_ITEM_FIELDS = frozenset(TaskCreateInput._declared_fields)
_FLOAT_BOUNDS = {"retry_backoff_s": 3600.0, "retry_backoff_max_s": 86400.0}


def _plain_item(data: Any) -> dict[str, Any] | None:
    """The validated fields of a bulk item given in its plain form (registered type, numbers
    as JSON numbers within bounds, no date, parent or key), or None for anything else, which
    the item serializer then judges with its own coercions and messages. Checking these by
    hand costs a few microseconds an item where the serializer's fields cost a hundred."""
    if not isinstance(data, dict) or not data.keys() <= _ITEM_FIELDS:
        return None
    task_type = data.get("type")
    if not isinstance(task_type, str) or len(task_type) > 64 or task_type not in registry:
        return None
    payload = data.get("payload", {})
    if payload is None:
        return None
    out: dict[str, Any] = {"type": task_type, "payload": payload}
    for name, low, high in (
        ("max_retries", 0, settings.QW_MAX_RETRIES_LIMIT),
        ("priority", 0, 9),
        ("timeout_s", 1, settings.QW_MAX_TIMEOUT_S),
        ("delay_ms", 0, MAX_DELAY_MS),
    ):
        if name in data:
            value = data[name]
            if value is None and name == "delay_ms":
                out[name] = None
                continue
            if type(value) is not int or not low <= value <= high:
                return None
            out[name] = value
    for name, cap in _FLOAT_BOUNDS.items():
        if name in data:
            number: Any = data[name]
            if number is not None:
                if type(number) not in (int, float) or not math.isfinite(number):
                    return None
                if not 0 <= number <= cap:
                    return None
            out[name] = None if number is None else float(number)
    if "retry_jitter" in data:
        if type(data["retry_jitter"]) is not bool:
            return None
        out["retry_jitter"] = data["retry_jitter"]
    for name in ("scheduled_at", "parent", "idempotency_key"):
        if data.get(name) is not None:
            return None
    return out


def validate_bulk_items(items: list[Any], *, request: Any) -> list[TaskSpec]:
    """Validate every item of a bulk body in one pass; all valid, or a 400 naming each item
    at fault and its field (``{"tasks": {"17": {"payload": {"url": [...]}}}}``).

    An item in its plain form (``_plain_item``) has its payload checked against its type's
    compiled schema and rules; any other item goes through ``BulkItemInput``, so both answer
    with the same rules and messages.
    """
    owner = getattr(request, "user", None)
    specs: list[TaskSpec] = []
    errors: dict[str, Any] = {}
    for index, item in enumerate(items):
        plain = _plain_item(item)
        if plain is None:
            serializer = BulkItemInput(data=item, context={"owner": owner})
            if serializer.is_valid():
                specs.append(build_spec(serializer.validated_data))
            else:
                errors[str(index)] = serializer.errors
            continue
        try:
            check_payload(
                plain["type"],
                plain["payload"],
                timeout_s=plain.get("timeout_s", settings.QW_DEFAULT_TIMEOUT_S),
                owner=owner,
            )
        except serializers.ValidationError as exc:
            errors[str(index)] = exc.detail
            continue
        specs.append(build_spec(plain))
    if errors:
        raise serializers.ValidationError({"tasks": errors})
    return specs


def bulk_items(data: Any) -> list[Any] | None:
    """The items of a bulk body of the plain shape ``{"tasks": [1..QW_BULK_MAX items]}``, or
    None: ``TaskBulkCreateInput`` then answers for the shape."""
    if not isinstance(data, dict) or data.keys() != {"tasks"}:
        return None
    items = data["tasks"]
    if not isinstance(items, list) or not 0 < len(items) <= settings.QW_BULK_MAX:
        return None
    return items


class TaskBulkCreateOutput(serializers.Serializer):
    ids = serializers.ListField(child=serializers.UUIDField())


class WaitReasonSerializer(serializers.Serializer):
    code = serializers.CharField()
    detail = serializers.CharField()
    until = serializers.DateTimeField(required=False, allow_null=True)


class TaskOutput(RedactedFields, serializers.Serializer):
    """A task as the API shows it.

    Declared field by field rather than as a ModelSerializer, which introspects the model
    again for every response: on the create path that cost more than the insert.
    ``payload`` and ``error`` pass the redaction rule (``queueworker.redaction``).
    """

    redacted_fields = ("payload", "error")

    id = serializers.UUIDField(read_only=True)
    type = serializers.CharField(read_only=True)
    status = serializers.ChoiceField(choices=TaskStatus.choices, read_only=True)
    owner = serializers.CharField(source="owner.get_username", read_only=True)
    payload = serializers.JSONField(read_only=True)
    priority = serializers.IntegerField(read_only=True)
    queue = serializers.CharField(read_only=True)
    retries = serializers.IntegerField(read_only=True)
    max_retries = serializers.IntegerField(read_only=True)
    error = serializers.CharField(read_only=True)
    failure_class = serializers.CharField(read_only=True)
    result = serializers.JSONField(read_only=True, allow_null=True)
    scheduled_at = serializers.DateTimeField(read_only=True, allow_null=True)
    next_attempt_at = serializers.DateTimeField(read_only=True, allow_null=True)
    timeout_s = serializers.IntegerField(read_only=True)
    idempotency_key = serializers.CharField(read_only=True, allow_null=True)
    # Named after the model field; DRF keeps declared fields apart from Field.parent.
    parent = serializers.UUIDField(  # type: ignore[assignment]
        source="parent_id", read_only=True, allow_null=True
    )
    workflow_run = serializers.UUIDField(source="workflow_run_id", read_only=True, allow_null=True)
    step = serializers.CharField(read_only=True, allow_null=True)
    cancel_requested = serializers.BooleanField(read_only=True)
    attempt = serializers.IntegerField(read_only=True)
    lease_expires_at = serializers.DateTimeField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    started_at = serializers.DateTimeField(read_only=True, allow_null=True)
    finished_at = serializers.DateTimeField(read_only=True, allow_null=True)
    wait_reason = serializers.SerializerMethodField()

    @extend_schema_field(WaitReasonSerializer(allow_null=True))
    def get_wait_reason(self, task: Task) -> dict[str, Any] | None:
        # A create answers without asking the broker about consumers (its latency counts).
        return selectors.wait_reason(task, ask_broker=not self.context.get("created"))


class TaskDetailOutput(TaskOutput):
    children = serializers.SerializerMethodField()

    @extend_schema_field(serializers.ListField(child=serializers.UUIDField()))
    def get_children(self, task: Task) -> list[str]:
        if self.context.get("created"):
            return []  # a task created by this request has no children yet
        return [str(pk) for pk in task.children.order_by("created_at").values_list("pk", flat=True)]


class TaskLogOutput(RedactedFields, serializers.ModelSerializer):
    redacted_fields = ("message", "data")
    data = serializers.JSONField()  # type: ignore[assignment]  # a field, not Serializer.data

    class Meta:
        model = TaskLog
        fields = ["id", "level", "event", "message", "data", "created_at"]
        read_only_fields = fields
