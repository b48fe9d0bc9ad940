"""OpenAPI additions: each task type's payload schema, straight from the handler registry.

``TasksAppConfig.ready()`` registers ``add_payload_schemas`` with ``queueworker.schema``, which
runs it on every generated document.
"""

from __future__ import annotations

import copy
from typing import Any

from tasks_app.handlers.registry import registry

_CREATE_COMPONENTS = ("TaskCreateInputRequest", "BulkItemInputRequest")


def add_payload_schemas(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Publish ``<TYPE>Payload`` components and point the create bodies' ``payload`` at them."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    refs = []
    for spec in registry:
        name = f"{_camel(spec.type)}Payload"
        schema = copy.deepcopy(spec.schema)
        schema.setdefault("title", f"{spec.type} payload")
        if spec.description:
            schema.setdefault("description", spec.description)
        schemas[name] = schema
        refs.append({"$ref": f"#/components/schemas/{name}"})
    for component in _CREATE_COMPONENTS:
        properties = schemas.get(component, {}).get("properties", {})
        if "payload" in properties:
            properties["payload"] = {
                "description": "Checked against the payload schema of the task's `type`: "
                + ", ".join(f"`{spec.type}` → `{_camel(spec.type)}Payload`" for spec in registry)
                + ".",
                "anyOf": refs,
            }
    return result


def _camel(task_type: str) -> str:
    return "".join(part.capitalize() for part in task_type.split("_"))
