"""The rules of a create body, apart from the API so that the service gate
(``tasks_app.services.task_validate``) applies the same ones without a request."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from tasks_app import selectors
from tasks_app.handlers.registry import registry

MAX_DELAY_MS = 366 * 24 * 3600 * 1000


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, naming them, instead of silently dropping them."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


def payload_errors(
    problems: list[tuple[str, str]], *, document: bool = False
) -> dict[str, Any] | list[str]:
    """Shape (json path, message) pairs as DRF nested errors under ``payload``.

    ``{"sleep_ms": ["-1 is less than the minimum of 0"]}`` when every problem sits under a
    top-level key; otherwise, or for a ``document`` payload (a data pipeline), a list of
    ``"path: message"`` strings.
    """
    if problems and not document and all(path for path, _ in problems):
        nested: dict[str, list[str]] = {}
        for path, message in problems:
            head, _, rest = path.partition(".")
            if "[" in head:
                head, _, tail = head.partition("[")
                rest = f"[{tail}" + (f".{rest}" if rest else "")
            nested.setdefault(head, []).append(f"{rest}: {message}" if rest else message)
        return nested
    return [f"{path}: {message}" if path else message for path, message in problems]


def check_payload(task_type: str, payload: Any, *, timeout_s: int, owner: Any) -> None:
    """Apply the create rules of ``task_type`` to ``payload``: its schema, its cross-field checks
    (the HTTP destination guard, secret references), the rules against the task's ``timeout_s``
    and against ``owner``. Raises a 400 naming ``payload`` (or ``type``, if not registered).

    Create and every other path that writes a payload (a redrive that edits it) call this, so
    that no payload reaches a worker unchecked.
    """
    spec = registry.get(task_type)
    if spec is None:
        raise serializers.ValidationError({"type": [f"Unknown task type '{task_type}'."]})
    problems = spec.validate(payload, timeout_s=timeout_s, owner=owner)
    if problems:
        raise serializers.ValidationError(
            {"payload": payload_errors(problems, document=spec.document)}
        )


def _owner(serializer: serializers.Serializer) -> Any:
    """Who creates the task: ``context["owner"]`` (the service gate, a schedule), else the
    request's user (a view), so that no caller builds a request to name its owner."""
    if "owner" in serializer.context:
        return serializer.context["owner"]
    return getattr(serializer.context.get("request"), "user", None)


class TaskCreateRules(StrictSerializer):
    """The fields of a create body and their rules; ``TaskCreateInput`` adds the API's spec."""

    type = serializers.CharField(max_length=64, help_text="A registered task type, e.g. NOOP.")
    payload = serializers.JSONField(
        required=False, default=dict, help_text="Checked against the type's payload schema."
    )
    max_retries = serializers.IntegerField(
        required=False, min_value=0, help_text="Retries after the first attempt."
    )
    priority = serializers.IntegerField(
        required=False, default=0, min_value=0, max_value=9, help_text="0–9, higher runs sooner."
    )
    scheduled_at = serializers.DateTimeField(
        required=False, allow_null=True, help_text="Not before this time."
    )
    delay_ms = serializers.IntegerField(
        required=False, allow_null=True, min_value=0, max_value=MAX_DELAY_MS
    )
    timeout_s = serializers.IntegerField(
        required=False, min_value=1, help_text="The handler's time limit in seconds."
    )
    # DRF keeps declared fields apart from Field.parent; the stubs cannot tell.
    parent = serializers.UUIDField(required=False, allow_null=True)  # type: ignore[assignment]
    retry_backoff_s = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0,
        max_value=3600,
        help_text="Backoff base for this task (default QW_BACKOFF_BASE_S).",
    )
    retry_backoff_max_s = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0,
        max_value=86400,
        help_text="Backoff cap for this task (default QW_BACKOFF_CAP_S).",
    )
    retry_jitter = serializers.BooleanField(
        required=False, default=True, help_text="Full jitter on the backoff (default true)."
    )
    idempotency_key = serializers.CharField(
        required=False,
        allow_null=True,
        max_length=255,
        help_text="Or the Idempotency-Key header; the same key returns the same task.",
    )

    def validate_type(self, value: str) -> str:
        if value not in registry:
            known = ", ".join(registry.types())
            raise serializers.ValidationError(f"Unknown task type '{value}'. Known types: {known}.")
        return value

    def validate_max_retries(self, value: int) -> int:
        if value > settings.QW_MAX_RETRIES_LIMIT:
            raise serializers.ValidationError(
                f"Ensure this value is less than or equal to {settings.QW_MAX_RETRIES_LIMIT}."
            )
        return value

    def validate_timeout_s(self, value: int) -> int:
        if value > settings.QW_MAX_TIMEOUT_S:
            raise serializers.ValidationError(
                f"Ensure this value is less than or equal to {settings.QW_MAX_TIMEOUT_S} "
                "(QW_MAX_TIMEOUT_S)."
            )
        return value

    def validate_parent(self, value: Any) -> Any:
        if value is None:
            return None
        user = _owner(self)
        if user is None or not selectors.task_queryset(user).filter(pk=value).exists():
            raise serializers.ValidationError(f"No task {value}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("scheduled_at") is not None and attrs.get("delay_ms") is not None:
            raise serializers.ValidationError(
                {"delay_ms": ["Give scheduled_at or delay_ms, not both."]}
            )
        check_payload(
            attrs["type"],
            attrs.get("payload", {}),
            timeout_s=attrs.get("timeout_s", settings.QW_DEFAULT_TIMEOUT_S),
            owner=_owner(self),
        )
        return attrs
