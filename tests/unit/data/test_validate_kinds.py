"""``validate`` on columns that mix JSON kinds, the types it gives, and linear-time patterns."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import polars as pl
import pytest

from tasks_app.data import frame_from_records, iter_json_records
from tasks_app.data.schema_check import valid_mask
from tests.unit.data._support import assert_same, batched, rows_of, run


def _validate(schema: Any, on_invalid: str = "drop") -> dict[str, Any]:
    return {"op": "validate", "schema": schema, "on_invalid": on_invalid}


AGE = {"type": "object", "properties": {"age": {"type": "integer"}}}


def test_validate_mixed_ages_then_filter_needs_no_cast() -> None:
    # given ages that are numbers but one, which is text
    records = [{"name": f"p{i}", "age": 10 + 6 * i} for i in range(6)]
    records[3]["age"] = "forty"
    operations = [_validate(AGE), {"op": "filter", "where": {"field": "age", "gte": 18}}]

    # when
    result = run(operations, records)

    # then only the text is invalid, and the filter compares numbers
    assert rows_of(result.frame) == [
        {"name": "p2", "age": 22},
        {"name": "p4", "age": 34},
        {"name": "p5", "age": 40},
    ]
    assert result.frame.schema["age"] == pl.Int64
    assert result.stats["invalid"] == 1
    assert result.invalid_samples == [
        {
            "row": 3,
            "operation": "operations[0]",
            "reason": 'age: "forty" is not of type "integer"',
            "record": {"name": "p3", "age": "forty"},
        }
    ]
    assert_same(batched(operations, records, 2), result)


def test_validate_mixed_column_tells_a_string_from_the_value_it_spells() -> None:
    records: list[dict[str, Any]] = [
        {"v": 1},
        {"v": "1"},
        {"v": True},
        {"v": "true"},
        {"v": 1.5},
        {"v": None},
        {"v": {"a": 1}},
        {},
    ]
    frame = frame_from_records(records)

    def mask(schema: dict[str, Any]) -> list[bool]:
        return valid_mask(frame, {"properties": {"v": schema}}).to_list()

    assert mask({"type": "integer"}) == [True, False, False, False, False, False, False, True]
    assert mask({"type": "string"}) == [False, True, False, True, False, False, False, True]
    assert mask({"type": "boolean"}) == [False, False, True, False, False, False, False, True]
    assert mask({"type": "object"}) == [False, False, False, False, False, False, True, True]
    assert mask({"const": "1"}) == [False, True, False, False, False, False, False, True]
    assert mask({"enum": [1, True]}) == [True, False, True, False, False, False, False, True]
    assert mask({"minimum": 1.2}) == [False, True, True, True, True, True, True, True]
    # Row by row (a reference), the values are the input's too.
    by_reference = {"$defs": {"i": {"type": "integer"}}, "properties": {"v": {"$ref": "#/$defs/i"}}}
    assert valid_mask(frame, by_reference).to_list() == mask({"type": "integer"})


def test_validate_mixed_integer_beyond_64_bits_is_a_float_on_every_path() -> None:
    # As in a number column: compiled or row by row, 2**70 is the float it is held as.
    frame = frame_from_records([{"v": 2**70}, {"v": "x"}, {"v": 5}])
    below = {"maximum": 2**70 - 1}

    compiled = valid_mask(frame, {"properties": {"v": below}}).to_list()
    by_reference = {"$defs": {"m": below}, "properties": {"v": {"$ref": "#/$defs/m"}}}

    assert valid_mask(frame, by_reference).to_list() == compiled == [True, True, True]
    typed = run([_validate({"properties": {"v": {"type": "integer"}}})], [{"v": 2**70}, {"v": 1}])
    assert typed.frame.get_column("v").to_list() == [float(2**70), 1.0]


def test_validate_column_of_empty_objects_holds_objects() -> None:
    result = run([_validate({"properties": {"o": {"type": "object"}}})], [{"o": {}}, {"o": {}}])

    assert result.stats["invalid"] == 0


def test_validate_jsonl_with_some_unknown_ages_rejects_only_those() -> None:
    # given 20,000 JSON Lines where 2 % of the ages are the string "unknown"
    lines = []
    for i in range(20_000):
        age: Any = "unknown" if i % 50 == 7 else 18 + i % 60
        lines.append(json.dumps({"id": i, "country": "DE FR IT".split()[i % 3], "age": age}))
    records = list(iter_json_records(io.BytesIO("\n".join(lines).encode()), "jsonl"))
    operations = [
        _validate({"required": ["age"], "properties": {"age": {"type": "integer", "minimum": 0}}}),
        {
            "op": "aggregate",
            "group_by": ["country"],
            "metrics": {"people": {"count": "*"}, "mean_age": {"avg": "age"}},
        },
    ]

    # when
    result = batched(operations, records, 5_000)

    # then the 400 unknown ages are invalid, and the rest are aggregated as numbers
    bad = [i for i in range(20_000) if i % 50 == 7]
    assert result.stats["invalid"] == len(bad) == 400
    assert [s["row"] for s in result.invalid_samples] == bad[:20]
    assert result.invalid_samples[0]["reason"] == 'age: "unknown" is not of type "integer"'
    expected = {}
    for country in ("DE", "FR", "IT"):
        ages = [r["age"] for r in records if r["country"] == country and r["age"] != "unknown"]
        expected[country] = {"people": len(ages), "mean_age": sum(ages) / len(ages)}
    got = {row["country"]: row for row in rows_of(result.frame)}
    for country, metrics in expected.items():
        assert got[country]["people"] == metrics["people"]
        assert got[country]["mean_age"] == pytest.approx(metrics["mean_age"])


@pytest.mark.parametrize(
    ("records", "schema", "dtype", "values"),
    [
        ([{"v": 1}, {"v": "x"}, {"v": 2}], {"type": "integer"}, pl.Int64, [1, 2]),
        ([{"v": 1}, {"v": 2.5}, {"v": "x"}], {"type": "number"}, pl.Float64, [1.0, 2.5]),
        ([{"v": 1}, {"v": "2"}], {"type": ["number", "integer"]}, pl.Int64, [1]),
        ([{"v": 1}, {"v": "x"}, {"v": None}], {"type": ["string", "null"]}, pl.String, ["x", None]),
        ([{"v": True}, {"v": "no"}, {}], {"type": "boolean"}, pl.Boolean, [True, None]),
        # A float column stays Float64: 1e20 is an integer too, beyond 64 bits.
        ([{"v": 1.0}, {"v": 2.5}], {"type": "integer"}, pl.Float64, [1.0]),
        # Only the nulls of a text column pass: the column is Int64 of nulls.
        ([{"v": "a"}, {"v": None}], {"type": ["integer", "null"]}, pl.Int64, [None]),
        ([{"v": 1}, {"v": 2}], {"type": "integer"}, pl.Int64, [1, 2]),
    ],
)
def test_validate_gives_a_field_of_one_type_that_type(
    records: list[dict[str, Any]], schema: dict[str, Any], dtype: pl.DataType, values: list[Any]
) -> None:
    validate = _validate({"properties": {"v": schema}}, "collect")
    sort = {"op": "sort", "by": [{"field": "v", "desc": True}]}
    top = {"op": "aggregate", "metrics": {"top": {"max": "v"}}}

    validated = run([validate], records)

    assert validated.frame.schema["v"] == dtype
    assert validated.frame.get_column("v").to_list() == values
    # What follows needs no cast.
    assert run([validate, sort], records).frame.schema["v"] == dtype
    assert run([validate, top], records).frame.schema["top"] == dtype
    if dtype.is_numeric():
        summed = run([validate, {"op": "aggregate", "metrics": {"s": {"sum": "v"}}}], records)
        assert summed.frame.get_column("s").to_list() == [sum(v for v in values if v)]
        kept = run([validate, {"op": "filter", "where": {"field": "v", "gte": 1}}], records)
        assert kept.frame.get_column("v").to_list() == [v for v in values if v is not None]


def test_validate_types_a_mixed_column_the_same_in_every_batch() -> None:
    # The first batch holds only integers and text, the second a float.
    records = [{"v": 3}, {"v": "x"}, {"v": 2.5}, {"v": 1}]
    operations = [
        _validate({"properties": {"v": {"type": "number"}}}),
        {"op": "sort", "by": [{"field": "v"}]},
    ]

    result = batched(operations, records, 2)

    assert_same(result, run(operations, records))
    assert result.frame is not None
    assert result.frame.get_column("v").to_list() == [1.0, 2.5, 3.0]


def test_clean_rename_select_keep_each_values_kind() -> None:
    records = [{"v": " 5 ", "o": 1}, {"v": 5, "o": 2}, {"v": "x", "o": 3}, {"v": {"K": 1}, "o": 4}]
    integer_or_k = {"anyOf": [{"type": "integer"}, {"type": "object", "required": ["K"]}]}
    operations = [
        {"op": "clean", "trim": True, "lower": ["v"]},
        {"op": "rename", "fields": {"v": "w"}},
        {"op": "select", "fields": ["w"]},
        _validate({"properties": {"w": integer_or_k}}),
    ]

    result = run(operations, records)

    # "5" is still a string once trimmed; the object's keys are not text to lower.
    assert [s["row"] for s in result.invalid_samples] == [0, 2]
    assert [s["record"] for s in result.invalid_samples] == [{"w": "5"}, {"w": "x"}]


# --- regular expressions run in linear time -----------------------------------------------------

EVIL = "^(\\w+\\s?)*$"  # backtracks exponentially on Python's re: "a" * 30 + "!" takes minutes


@pytest.mark.parametrize(
    "schema",
    [
        {"properties": {"name": {"pattern": EVIL}}},
        {"properties": {"name": {"anyOf": [{"pattern": EVIL}, {"maxLength": 3}]}}},
        {"patternProperties": {EVIL: {"type": "integer"}}},
        {"patternProperties": {EVIL: True}, "additionalProperties": False},
    ],
)
def test_validate_catastrophic_pattern_takes_milliseconds(schema: dict[str, Any]) -> None:
    evil = "a" * 30 + "!"
    records = [{"id": i, "name": evil + str(i), evil: "x"} for i in range(40)]

    started = time.perf_counter()
    result = run([_validate(schema)], records)
    elapsed = time.perf_counter() - started

    assert result.stats["invalid"] == 40
    assert len(result.invalid_samples) == 20
    assert all(sample["reason"] for sample in result.invalid_samples)
    assert elapsed < 1.0
