"""``payload_problems``: every mistake named by its JSON path, relative to the payload."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tasks_app.data import PAYLOAD_SCHEMA, payload_problems
from tasks_app.data.payload_ops import MAX_WHERE_DEPTH


def _with_ops(*operations: Any) -> list[tuple[str, str]]:
    return payload_problems({"records": [], "operations": list(operations)})


def test_payload_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(PAYLOAD_SCHEMA)


def test_payload_design_example_has_no_problems() -> None:
    operations = [
        {"op": "validate", "schema": {"type": "object"}, "on_invalid": "drop"},
        {
            "op": "clean",
            "trim": True,
            "lower": ["email"],
            "upper": [],
            "empty_as_null": True,
            "drop_null": ["email"],
        },
        {"op": "rename", "fields": {"old": "new"}},
        {"op": "select", "fields": ["id", "email"]},
        {"op": "cast", "fields": {"age": "int", "joined": "date"}},
        {
            "op": "filter",
            "where": {
                "all": [{"field": "age", "gte": 18}, {"field": "country", "in": ["DE", "FR"]}]
            },
        },
        {"op": "dedupe", "keys": ["email"], "keep": "first"},
        {"op": "sort", "by": [{"field": "amount", "desc": True}]},
        {
            "op": "aggregate",
            "group_by": ["country"],
            "metrics": {
                "people": {"count": "*"},
                "total": {"sum": "amount"},
                "mean_age": {"avg": "age"},
            },
        },
        {"op": "limit", "n": 100},
    ]
    payload = {
        "source": {"url": "https://example.com/data.csv"},
        "format": "csv",
        "operations": operations,
        "batch_size": 50_000,
        "output": "artifact",
        "output_format": "csv",
    }

    assert payload_problems(payload) == []


@pytest.mark.parametrize(
    "source",
    [
        "http://example.com/x.json",
        {"url": "https://example.com/x"},
        {"artifact": "6f1c1a0e-8b0a-4a43-9d1e-1b2c3d4e5f60"},
        {"task": "6f1c1a0e8b0a4a439d1e1b2c3d4e5f60"},
    ],
)
def test_payload_source_shapes_are_accepted(source: Any) -> None:
    assert payload_problems({"source": source}) == []


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({}, ("records", "give records (a list of objects) or a source")),
        ({"records": [], "source": "https://x.io"}, ("source", "give records or source, not both")),
        ({"records": [1]}, ("records[0]", "1 is not of type 'object'")),
        ({"source": "ftp://x.io/a"}, ("source", "must be an http:// or https:// URL")),
        (
            {"source": {"url": "file:///etc/passwd"}},
            ("source.url", "must be an http:// or https:// URL"),
        ),
        ({"source": {"artifact": "nope"}}, ("source.artifact", "must be a UUID")),
        ({"source": {}}, ("source", "give exactly one of url, artifact or task")),
        (
            {"source": {"url": "https://a.b", "task": "6f1c1a0e8b0a4a439d1e1b2c3d4e5f60"}},
            ("source", "give exactly one of url, artifact or task"),
        ),
        ({"source": {"path": "/tmp/x"}}, ("source.path", "unknown field")),
        (
            {"records": [], "format": "xml"},
            ("format", "'xml' is not one of ['json', 'jsonl', 'csv']"),
        ),
        ({"records": [], "batch_size": 0}, ("batch_size", "0 is less than the minimum of 1")),
        (
            {"records": [], "batch_size": 1_000_001},
            ("batch_size", "1000001 is greater than the maximum of 1000000"),
        ),
        ({"records": [], "batch_size": True}, ("batch_size", "True is not of type 'integer'")),
        (
            {"records": [], "output": "email"},
            ("output", "'email' is not one of ['inline', 'artifact']"),
        ),
        (
            {"records": [], "output_format": "xlsx"},
            ("output_format", "'xlsx' is not one of ['jsonl', 'csv', 'json']"),
        ),
        ({"records": [], "extra": 1}, ("extra", "unknown field")),
        ({"records": [], "operations": {}}, ("operations", "{} is not of type 'array'")),
        (
            {"records": [], "operations": [{"op": "limit", "n": 1}] * 101},
            ("operations", "is too long"),
        ),
    ],
)
def test_payload_mistakes_are_named_by_path(payload: Any, problem: tuple[str, str]) -> None:
    problems = payload_problems(payload)

    assert any(path == problem[0] and problem[1] in message for path, message in problems), problems


def test_payload_that_is_not_an_object_has_a_problem() -> None:
    assert payload_problems([1]) == [("", "[1] is not of type 'object'")]


@pytest.mark.parametrize(
    ("operation", "problem"),
    [
        ({}, ("operations[0].op", "this field is required")),
        ({"op": "explode"}, ("operations[0].op", "'explode' is not one of")),
        ({"op": "validate"}, ("operations[0].schema", "this field is required")),
        (
            {"op": "validate", "schema": {"type": "integr"}},
            ("operations[0].schema", "not a valid JSON Schema: 'integr' is not valid under any"),
        ),
        (
            {"op": "validate", "schema": {"properties": {"a": {"pattern": "(["}}}},
            ("operations[0].schema.properties.a.pattern", "'([' is not a regular expression"),
        ),
        (
            # Look-around and backreferences need a backtracking engine: refused.
            {"op": "validate", "schema": {"properties": {"name": {"pattern": "(?<=x)y"}}}},
            ("operations[0].schema.properties.name.pattern", "runs (it has no look-around"),
        ),
        (
            {"op": "validate", "schema": {"items": {"patternProperties": {"^(a)\\1$": {}}}}},
            ("operations[0].schema.items.patternProperties", "'^(a)\\\\1$' is not a regular"),
        ),
        (
            {"op": "validate", "schema": {}, "on_invalid": "ignore"},
            ("operations[0].on_invalid", "'ignore' is not one of ['drop', 'collect', 'fail']"),
        ),
        ({"op": "clean", "trim": "yes"}, ("operations[0].trim", "'yes' is not of type 'boolean'")),
        ({"op": "clean", "lower": "email"}, ("operations[0].lower", "is not of type 'array'")),
        ({"op": "clean", "strip": True}, ("operations[0].strip", "unknown field")),
        ({"op": "rename", "fields": {"a": ""}}, ("operations[0].fields.a", "should be non-empty")),
        (
            {"op": "rename", "fields": {"a": "c", "b": "c"}},
            ("operations[0].fields.b", "'a' is renamed to 'c' too"),
        ),
        ({"op": "rename", "fields": {"a": "__qw_row"}}, ("operations[0].fields", "reserved")),
        ({"op": "select", "fields": []}, ("operations[0].fields", "should be non-empty")),
        (
            {"op": "select", "fields": ["a", "a"]},
            ("operations[0].fields[1]", "'a' is listed twice"),
        ),
        (
            {"op": "cast", "fields": {"age": "integr"}},
            (
                "operations[0].fields.age",
                "unknown type 'integr'; one of int, float, bool, str, date, datetime",
            ),
        ),
        (
            {"op": "cast", "fields": {"age": "int"}, "on_invalid": "skip"},
            ("operations[0].on_invalid", "'skip' is not one of"),
        ),
        ({"op": "filter"}, ("operations[0].where", "this field is required")),
        ({"op": "dedupe", "keys": []}, ("operations[0].keys", "should be non-empty")),
        (
            {"op": "dedupe", "keys": ["a"], "keep": "any"},
            ("operations[0].keep", "'any' is not one of"),
        ),
        (
            {"op": "sort", "by": [{"desc": True}]},
            ("operations[0].by[0].field", "this field is required"),
        ),
        (
            {"op": "sort", "by": [{"field": "a", "order": "desc"}]},
            ("operations[0].by[0].order", "unknown field"),
        ),
        ({"op": "aggregate", "metrics": {}}, ("operations[0].metrics", "should be non-empty")),
        (
            {"op": "aggregate", "metrics": {"t": {"total": "a"}}},
            ("operations[0].metrics.t.total", "unknown field"),
        ),
        (
            {"op": "aggregate", "metrics": {"t": {}}},
            ("operations[0].metrics.t", "give exactly one of count, sum, avg, min, max"),
        ),
        (
            {"op": "aggregate", "metrics": {"t": {"sum": "a", "avg": "a"}}},
            ("operations[0].metrics.t", "give exactly one of"),
        ),
        (
            {"op": "aggregate", "metrics": {"t": {"sum": "*"}}},
            ("operations[0].metrics.t.sum", "sum needs a field; only count takes '*'"),
        ),
        (
            {"op": "aggregate", "group_by": ["c"], "metrics": {"c": {"count": "*"}}},
            ("operations[0].metrics.c", "'c' is a group_by field too"),
        ),
        ({"op": "limit", "n": -1}, ("operations[0].n", "-1 is less than the minimum of 0")),
        ({"op": "limit", "n": 1.5}, ("operations[0].n", "1.5 is not of type 'integer'")),
    ],
)
def test_operation_mistakes_are_named_by_path(operation: Any, problem: tuple[str, str]) -> None:
    problems = _with_ops(operation)

    assert any(path == problem[0] and problem[1] in message for path, message in problems), problems


@pytest.mark.parametrize(
    ("where", "problem"),
    [
        ({"eq": 1}, ("operations[0].where.field", "this field is required")),
        ({"field": ""}, ("operations[0].where.field", "must be a non-empty string")),
        ({"field": "a"}, ("operations[0].where", "give one operator: eq, ne, lt")),
        (
            {"field": "a", "eq": 1, "lt": 2},
            ("operations[0].where", "give only one operator, not eq and lt"),
        ),
        ({"field": "a", "like": "x"}, ("operations[0].where.like", "unknown field")),
        ({"field": "a", "eq": None}, ("operations[0].where.eq", "use is_null to test for null")),
        (
            {"field": "a", "eq": [1]},
            ("operations[0].where.eq", "must be a string, a number or a boolean"),
        ),
        ({"field": "a", "gt": True}, ("operations[0].where.gt", "booleans have no order")),
        ({"field": "a", "in": []}, ("operations[0].where.in", "must be a non-empty list")),
        ({"field": "a", "in": [1, None]}, ("operations[0].where.in[1]", "use is_null")),
        (
            {"field": "a", "is_null": "yes"},
            ("operations[0].where.is_null", "must be true or false"),
        ),
        ({"all": {"field": "a"}}, ("operations[0].where.all", "must be a list of conditions")),
        ({"all": [], "field": "a"}, ("operations[0].where.field", "unknown field")),
        (
            {"any": [{"all": [{"field": "a", "eq": 1}, {"eq": 2}]}]},
            ("operations[0].where.any[0].all[1].field", "this field is required"),
        ),
        ({"any": ["x"]}, ("operations[0].where.any[0]", "must be a condition object")),
    ],
)
def test_where_mistakes_are_named_by_path(where: Any, problem: tuple[str, str]) -> None:
    problems = _with_ops({"op": "filter", "where": where})

    assert any(path == problem[0] and problem[1] in message for path, message in problems), problems


def test_where_nested_too_deeply_is_refused() -> None:
    where: dict[str, Any] = {"field": "a", "eq": 1}
    for _ in range(MAX_WHERE_DEPTH + 2):
        where = {"all": [where]}

    problems = _with_ops({"op": "filter", "where": where})

    assert len(problems) == 1
    assert problems[0][1] == f"conditions nested deeper than {MAX_WHERE_DEPTH}"


def test_problems_of_several_operations_keep_their_order() -> None:
    problems = _with_ops(
        {"op": "limit", "n": 1},
        {"op": "cast", "fields": {"a": "number"}},
        {"op": "filter", "where": {"field": "a"}},
    )

    assert [path for path, _ in problems] == ["operations[1].fields.a", "operations[2].where"]


def test_validate_pattern_that_only_python_rejects_is_accepted() -> None:
    # Unicode classes run on the linear-time engine; Python's re could not compile them.
    schema = {"properties": {"name": {"pattern": "^\\p{L}+$"}}}

    assert _with_ops({"op": "validate", "schema": schema}) == []


def test_validate_patterns_in_data_keywords_are_not_regular_expressions() -> None:
    schema = {"properties": {"pattern": {"enum": ["(?<=x)"]}}, "const": {"pattern": "(a)\\1"}}

    assert _with_ops({"op": "validate", "schema": schema}) == []


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("http://127.0.0.1:9/schema.json", "Retrieval is disabled"),
        ("#/$defs/nowhere", "does not exist"),
    ],
)
def test_validate_reference_outside_the_schema_is_refused_not_fetched(
    ref: str, message: str
) -> None:
    schema = {"properties": {"a": {"$ref": ref}}}

    problems = _with_ops({"op": "validate", "schema": schema})

    assert [path for path, _ in problems] == ["operations[0].schema"]
    assert message in problems[0][1]
