"""The DATA_PROCESSING payload: its JSON Schema and every problem named by its JSON path.

``PAYLOAD_SCHEMA`` documents the payload (OpenAPI) and is the first check; it is written so
that its own errors read well (no ``oneOf`` whose only message is "not valid under any of the
given schemas"). ``payload_problems`` adds what a schema says badly or cannot say: records
*or* source, a JSON Schema that is itself valid, known cast types, the shape of ``where``
trees, metric names that do not collide. Paths are relative to the payload
(``operations[2].where.field``); the caller prefixes ``payload.``. URLs and ids are checked
for shape only: the caller applies its SSRF guard and looks ids up.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from tasks_app.data.payload_ops import OPERATION_SCHEMAS, operation_problems
from tasks_app.data.rules import json_path

MAX_OPERATIONS = 100
MAX_BATCH_SIZE = 1_000_000
_UUID = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
_URL = "^https?://[^\\s]+$"

PAYLOAD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "DATA_PROCESSING payload",
    "description": "Give `records` or `source` (not both); operations run in order.",
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "items": {"type": "object"},
            "description": "Inline input rows.",
        },
        "source": {
            "description": (
                'A URL ("http(s)://…"), or {"url": …}, {"artifact": "<uuid>"} or '
                '{"task": "<uuid>"} (the stored result of another task).'
            ),
            "type": ["string", "object"],
            "pattern": _URL,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "url": {"type": "string", "pattern": _URL},
                "artifact": {"type": "string", "pattern": _UUID},
                "task": {"type": "string", "pattern": _UUID},
            },
            "additionalProperties": False,
        },
        "format": {
            "enum": ["json", "jsonl", "csv"],
            "description": "The source's format (default: from the URL or stored type).",
        },
        "operations": {
            "type": "array",
            "maxItems": MAX_OPERATIONS,
            "items": {
                "type": "object",
                "required": ["op"],
                "properties": {"op": {"enum": list(OPERATION_SCHEMAS)}},
                "allOf": [
                    {
                        "if": {"properties": {"op": {"const": name}}, "required": ["op"]},
                        "then": schema,
                    }
                    for name, schema in OPERATION_SCHEMAS.items()
                ],
            },
        },
        "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_SIZE},
        "output": {"enum": ["inline", "artifact"], "default": "inline"},
        "output_format": {"enum": ["jsonl", "csv", "json"], "default": "jsonl"},
    },
    "additionalProperties": False,
}
Draft202012Validator.check_schema(PAYLOAD_SCHEMA)
_VALIDATOR = Draft202012Validator(PAYLOAD_SCHEMA)


def describe(error: ValidationError) -> list[tuple[str, str]]:
    """Name the field at fault: a missing or unknown property gets its own path.

    The convention of ``tasks_app.handlers.registry.describe`` (see ``rules.json_path``).
    """
    base = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [name for name in error.validator_value if name not in error.instance]
        return [(json_path([*base, name]), "this field is required") for name in missing]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {})) if isinstance(error.schema, dict) else set()
        extra = [name for name in error.instance if name not in known]
        return [(json_path([*base, name]), "unknown field") for name in extra]
    in_source = base[:1] == ["source"]
    if in_source and error.validator == "pattern":
        return [(json_path(base), _source_message(base))]
    if in_source and error.validator in ("minProperties", "maxProperties"):
        return [(json_path(base), "give exactly one of url, artifact or task")]
    return [(json_path(base), error.message)]


def _source_message(base: list[Any]) -> str:
    if base[-1] in ("artifact", "task"):
        return "must be a UUID"
    return "must be an http:// or https:// URL"


def _owned_by(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


def payload_problems(payload: Any, *, schema_checked: bool = False) -> list[tuple[str, str]]:
    """Every problem of a DATA_PROCESSING payload as (JSON path, message), in payload order.

    ``schema_checked``: the caller has already found the payload valid against
    ``PAYLOAD_SCHEMA`` (the handler registry does), so only the rules beyond it run: the
    schema pass is half the cost of a payload of inline records.
    """
    problems: list[tuple[str, str]] = []
    if not schema_checked:
        for error in _VALIDATOR.iter_errors(payload):
            problems.extend(describe(error))
    if not isinstance(payload, dict):
        return _unique(problems)
    if "records" in payload and "source" in payload:
        problems.append(("source", "give records or source, not both"))
    elif "records" not in payload and "source" not in payload:
        problems.append(("records", "give records (a list of objects) or a source"))
    operations = payload.get("operations")
    if isinstance(operations, list):
        for index, op in enumerate(operations):
            path = f"operations[{index}]"
            if isinstance(op, dict) and not any(_owned_by(p, path) for p, _ in problems):
                problems.extend(operation_problems(op, path))
    return _unique(problems)


def operations_problems(operations: Any) -> list[tuple[str, str]]:
    """The problems of an ``operations`` list alone (paths start with ``operations``)."""
    problems = payload_problems({"records": [], "operations": operations})
    return [(path, message) for path, message in problems if _owned_by(path, "operations")]


def _unique(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    result = []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            result.append(problem)
    return result
