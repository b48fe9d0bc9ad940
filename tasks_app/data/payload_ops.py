"""The operations' shapes (docs/task-types.md) and the checks their JSON Schemas cannot express.

A ``validate`` schema must be a valid Draft 2020-12 schema whose regular expressions
(``pattern``, ``patternProperties`` keys) the linear-time engine that runs them accepts (a
pattern it refuses, with look-around or backreferences, is named by its own path), and whose
references resolve within the schema: nothing is fetched.
"""

from __future__ import annotations

import functools
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator, FormatChecker

from tasks_app.data.rules import PREFIX, json_path, row_validator

CAST_TYPES = ("int", "float", "bool", "str", "date", "datetime")
METRICS = ("count", "sum", "avg", "min", "max", "count_distinct")
OPERATORS = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "contains", "is_null")
MAX_WHERE_DEPTH = 32

_FIELD: dict[str, Any] = {"type": "string", "minLength": 1}
_FIELDS: dict[str, Any] = {"type": "array", "items": _FIELD}
_ON_INVALID: dict[str, Any] = {"enum": ["drop", "collect", "fail"], "default": "drop"}


def _op(name: str, required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["op", *required],
        "properties": {"op": {"const": name}, **properties},
        "additionalProperties": False,
    }


OPERATION_SCHEMAS: dict[str, dict[str, Any]] = {
    "validate": _op(
        "validate", ["schema"], schema={"type": ["object", "boolean"]}, on_invalid=_ON_INVALID
    ),
    "clean": _op(
        "clean",
        [],
        trim={"type": "boolean"},
        lower=_FIELDS,
        upper=_FIELDS,
        empty_as_null={"type": "boolean"},
        drop_null=_FIELDS,
    ),
    "rename": _op(
        "rename",
        ["fields"],
        fields={"type": "object", "additionalProperties": _FIELD, "description": "{old: new}"},
    ),
    "select": _op("select", ["fields"], fields={**_FIELDS, "minItems": 1}),
    "cast": _op(
        "cast",
        ["fields"],
        fields={
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "{field: type}, a type being one of " + ", ".join(CAST_TYPES),
        },
        on_invalid=_ON_INVALID,
    ),
    "filter": _op(
        "filter",
        ["where"],
        where={
            "type": "object",
            "description": (
                '{"field": f, <op>: value} with <op> one of '
                + ", ".join(OPERATORS)
                + ', or {"all": [..]} / {"any": [..]} of such conditions'
            ),
        },
    ),
    "dedupe": _op(
        "dedupe",
        ["keys"],
        keys={**_FIELDS, "minItems": 1},
        keep={"enum": ["first", "last"], "default": "first"},
    ),
    "sort": _op(
        "sort",
        ["by"],
        by={
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["field"],
                "properties": {"field": _FIELD, "desc": {"type": "boolean"}},
                "additionalProperties": False,
            },
        },
    ),
    "aggregate": _op(
        "aggregate",
        ["metrics"],
        group_by=_FIELDS,
        metrics={
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "properties": {name: _FIELD for name in METRICS},
                "additionalProperties": False,
            },
            "description": (
                '{name: {"count": "*" | field} | {"sum" | "avg" | "min" | "max" | '
                '"count_distinct": field}}'
            ),
        },
    ),
    "limit": _op("limit", ["n"], n={"type": "integer", "minimum": 0}),
}


_REGEX_CHECKER = FormatChecker(formats=())


@_REGEX_CHECKER.checks("regex")
def _is_linear_regex(instance: object) -> bool:
    return not isinstance(instance, str) or runs_in_linear_time(instance)


@functools.lru_cache(maxsize=1024)
def runs_in_linear_time(pattern: str) -> bool:
    """Whether jsonschema-rs's standard (linear-time) regex engine accepts ``pattern``."""
    try:
        jsonschema_rs.validator_for(
            {"pattern": pattern}, pattern_options=jsonschema_rs.RegexOptions()
        )
    except ValueError:  # jsonschema_rs.ValidationError: the schema's pattern is not a "regex"
        return False
    return True


_META_VALIDATOR = Draft202012Validator(
    Draft202012Validator.META_SCHEMA, format_checker=_REGEX_CHECKER
)


def _schema_problems(schema: Any, path: str) -> list[tuple[str, str]]:
    errors = list(_META_VALIDATOR.iter_errors(schema))
    patterns = [e for e in errors if e.validator == "format" and e.validator_value == "regex"]
    if patterns:
        return [
            (
                json_path([path, "schema", *error.absolute_path]),
                f"{error.instance!r} is not a regular expression that the linear-time engine "
                "runs (it has no look-around and no backreferences)",
            )
            for error in patterns
        ]
    if errors:
        where = json_path(errors[0].absolute_path)
        at = f" (at {where})" if where else ""
        return [(f"{path}.schema", f"not a valid JSON Schema: {errors[0].message}{at}")]
    try:
        row_validator(schema)
    except ValueError as exc:  # a $ref that is not in the schema itself, say
        return [(f"{path}.schema", f"not a usable JSON Schema: {str(exc).splitlines()[0]}")]
    return []


def _reserved(names: Any, path: str) -> list[tuple[str, str]]:
    return [
        (path, f"names starting with {PREFIX!r} are reserved: {name!r}")
        for name in names
        if isinstance(name, str) and name.startswith(PREFIX)
    ]


def _duplicates(names: list[str], path: str) -> list[tuple[str, str]]:
    seen: set[str] = set()
    problems = []
    for index, name in enumerate(names):
        if name in seen:
            problems.append((f"{path}[{index}]", f"{name!r} is listed twice"))
        seen.add(name)
    return problems


def operation_problems(op: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """Checks of one operation that already matches its JSON Schema."""
    name = op["op"]
    if name == "validate":
        return _schema_problems(op["schema"], path)
    if name == "rename":
        problems = _reserved(op["fields"].values(), f"{path}.fields")
        targets: dict[str, str] = {}
        for old, new in op["fields"].items():
            if new in targets:
                problems.append(
                    (f"{path}.fields.{old}", f"{targets[new]!r} is renamed to {new!r} too")
                )
            targets[new] = old
        return problems
    if name == "select":
        return _duplicates(op["fields"], f"{path}.fields") + _reserved(
            op["fields"], f"{path}.fields"
        )
    if name == "cast":
        return [
            (f"{path}.fields.{field}", f"unknown type {kind!r}; one of {', '.join(CAST_TYPES)}")
            for field, kind in op["fields"].items()
            if kind not in CAST_TYPES
        ]
    if name == "filter":
        return where_problems(op["where"], f"{path}.where")
    if name == "aggregate":
        return _aggregate_problems(op, path)
    return []


def _aggregate_problems(op: dict[str, Any], path: str) -> list[tuple[str, str]]:
    group_by = op.get("group_by", [])
    problems = _duplicates(group_by, f"{path}.group_by")
    problems += _reserved(op["metrics"], f"{path}.metrics")
    for metric_name, spec in op["metrics"].items():
        where = f"{path}.metrics.{metric_name}"
        if metric_name in group_by:
            problems.append((where, f"{metric_name!r} is a group_by field too"))
        if len(spec) != 1:
            problems.append((where, f"give exactly one of {', '.join(METRICS)}"))
            continue
        metric, field = next(iter(spec.items()))
        if field == "*" and metric != "count":
            problems.append((f"{where}.{metric}", f"{metric} needs a field; only count takes '*'"))
    return problems


def _scalar_problem(value: Any, operator: str) -> str | None:
    if value is None:
        return "use is_null to test for null"
    if isinstance(value, dict | list):
        return "must be a string, a number or a boolean"
    if isinstance(value, bool) and operator in ("lt", "lte", "gt", "gte"):
        return "booleans have no order; use eq or ne"
    return None


def where_problems(node: Any, path: str, depth: int = 0) -> list[tuple[str, str]]:
    """The problems of a ``where`` tree, each at its own path."""
    if depth > MAX_WHERE_DEPTH:
        return [(path, f"conditions nested deeper than {MAX_WHERE_DEPTH}")]
    if not isinstance(node, dict):
        return [(path, "must be a condition object")]
    groups = [key for key in ("all", "any") if key in node]
    if groups:
        key = groups[0]
        problems = [(f"{path}.{other}", "unknown field") for other in node if other != key]
        if not isinstance(node[key], list):
            return [*problems, (f"{path}.{key}", "must be a list of conditions")]
        for index, child in enumerate(node[key]):
            problems += where_problems(child, f"{path}.{key}[{index}]", depth + 1)
        return problems
    problems = [
        (f"{path}.{key}", "unknown field")
        for key in node
        if key != "field" and key not in OPERATORS
    ]
    if "field" not in node:
        problems.append((f"{path}.field", "this field is required"))
    elif not isinstance(node["field"], str) or not node["field"]:
        problems.append((f"{path}.field", "must be a non-empty string"))
    operators = [key for key in OPERATORS if key in node]
    if not operators:
        problems.append((path, "give one operator: " + ", ".join(OPERATORS)))
    elif len(operators) > 1:
        problems.append((path, "give only one operator, not " + " and ".join(operators)))
    for operator in operators:
        value = node[operator]
        where = f"{path}.{operator}"
        if operator == "is_null":
            if not isinstance(value, bool):
                problems.append((where, "must be true or false"))
        elif operator == "in":
            if not isinstance(value, list) or not value:
                problems.append((where, "must be a non-empty list"))
                continue
            for index, item in enumerate(value):
                if (message := _scalar_problem(item, operator)) is not None:
                    problems.append((f"{where}[{index}]", message))
        elif (message := _scalar_problem(value, operator)) is not None:
            problems.append((where, message))
    return problems
