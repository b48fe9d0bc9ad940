from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tasks_app.api.serializers import StrictSerializer
from workflows_app.definition import JSON_SCHEMA


@extend_schema_field(JSON_SCHEMA)
class DefinitionField(serializers.JSONField):
    """A workflow definition (validated by the service, which names each path at fault)."""


@extend_schema_field({"type": "object", "description": "A JSON Schema for a run's input."})
class InputSchemaField(serializers.JSONField):
    pass


class WorkflowCreateInput(StrictSerializer):
    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    is_active = serializers.BooleanField(required=False, default=True)
    definition = DefinitionField()
    input_schema = InputSchemaField(required=False, allow_null=True, default=None)


class WorkflowUpdateInput(StrictSerializer):
    name = serializers.CharField(max_length=200, required=False)
    description = serializers.CharField(required=False, allow_blank=True)
    is_active = serializers.BooleanField(required=False)
    definition = DefinitionField(required=False)
    input_schema = InputSchemaField(required=False, allow_null=True)


class WorkflowOutput(serializers.Serializer):
    id = serializers.UUIDField(read_only=True)
    name = serializers.CharField(read_only=True)
    description = serializers.CharField(read_only=True)
    is_active = serializers.BooleanField(read_only=True)
    owner = serializers.CharField(source="owner.get_username", read_only=True)
    version = serializers.IntegerField(read_only=True, help_text="The current (latest) version.")
    definition = DefinitionField(read_only=True)
    input_schema = InputSchemaField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)


class WorkflowVersionOutput(serializers.Serializer):
    version = serializers.IntegerField(read_only=True)
    definition = DefinitionField(read_only=True)
    input_schema = InputSchemaField(read_only=True, allow_null=True)
    created_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField(read_only=True)

    def get_created_by(self, version: Any) -> str | None:
        return version.created_by.get_username() if version.created_by else None


class RunStartInput(StrictSerializer):
    input = serializers.JSONField(required=False, default=dict)


class RunStepOutput(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.CharField()
    task = serializers.UUIDField(allow_null=True)
    status = serializers.CharField(allow_null=True, help_text="null until the step starts")
    result = serializers.JSONField(allow_null=True)
    attempts = serializers.IntegerField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    wait_reason = serializers.DictField(
        allow_null=True, help_text="A step not started yet: the predecessors it waits for."
    )


class RunCompensationOutput(serializers.Serializer):
    step = serializers.CharField()
    task = serializers.UUIDField()
    status = serializers.CharField()
    finished_at = serializers.DateTimeField(allow_null=True)


class RunOutput(serializers.Serializer):
    id = serializers.UUIDField(read_only=True)
    workflow = serializers.UUIDField(source="workflow_id", read_only=True)
    version = serializers.IntegerField(source="version.version", read_only=True)
    owner = serializers.CharField(source="owner.get_username", read_only=True)
    status = serializers.CharField(read_only=True)
    input = serializers.JSONField(read_only=True)
    error = serializers.CharField(read_only=True)
    cancel_requested = serializers.BooleanField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)
    finished_at = serializers.DateTimeField(read_only=True, allow_null=True)


class RunDetailOutput(RunOutput):
    steps = RunStepOutput(many=True, read_only=True)
    compensations = RunCompensationOutput(many=True, read_only=True)

    def to_representation(self, instance: Any) -> Any:
        from workflows_app.selectors import run_steps

        data = super().to_representation(instance)
        steps, compensations = run_steps(instance)
        data["steps"] = RunStepOutput(steps, many=True).data
        data["compensations"] = RunCompensationOutput(compensations, many=True).data
        return data


class CompensateInput(StrictSerializer):
    action = serializers.JSONField(
        required=False,
        help_text="{type, payload}: the undo action, when the task's step declares none.",
    )

    def validate_action(self, value: Any) -> Any:
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise serializers.ValidationError("Must be an object {type, payload}.")
        unknown = sorted(set(value) - {"type", "payload", "max_retries"})
        if unknown:
            raise serializers.ValidationError(f"Unknown fields: {', '.join(unknown)}.")
        return value
