"""``COMPENSATION``: undo an earlier task by running an action through the same registry."""

from __future__ import annotations

from typing import Any

from tasks_app.errors import PermanentError
from tasks_app.handlers.registry import Context, register, registry
from tasks_app.task_types import TaskType

SCHEMA = {
    "type": "object",
    "required": ["compensates", "action"],
    "additionalProperties": False,
    "properties": {
        "compensates": {"type": "string", "format": "uuid", "description": "The task undone."},
        "action": {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string", "description": "A registered type (not COMPENSATION)."},
                "payload": {"description": "The action type's payload."},
            },
        },
    },
}


def _check_action(payload: Any) -> list[tuple[str, str]]:
    action = payload["action"]
    action_type = action["type"]
    if action_type == TaskType.COMPENSATION:
        return [("action.type", "a compensation cannot run another compensation")]
    spec = registry.get(action_type)
    if spec is None:
        return [("action.type", f"unknown task type '{action_type}'")]
    return [
        (f"action.payload.{path}" if path else "action.payload", message)
        for path, message in spec.validate(action.get("payload", {}))
    ]


@register(TaskType.COMPENSATION, schema=SCHEMA, extra_validator=_check_action)
def compensation(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``action`` ({type, payload}) to undo task ``compensates``; its retries, timeout and
    cancellation are the compensation task's own."""
    action = payload["action"]
    spec = registry.get(action["type"])
    if spec is None or action["type"] == TaskType.COMPENSATION:
        raise PermanentError(f"cannot compensate with type {action['type']!r}")
    problems = spec.validate(action.get("payload", {}))
    if problems:
        raise PermanentError(
            "invalid action payload: " + "; ".join(f"{p or '(root)'}: {m}" for p, m in problems)
        )
    result = spec.func(ctx, action.get("payload", {}))
    return {"compensates": payload["compensates"], "action": action["type"], "result": result}
