"""``validate``: JSON Schema per row, vectorised where it compiles, exact reasons for samples."""

from __future__ import annotations

import io
from typing import Any

import jsonschema
import jsonschema_rs
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tasks_app.data import DataError, frame_from_records, iter_csv_frames, run_single
from tasks_app.data.schema_check import records_for_validation, valid_mask
from tasks_app.data.schema_compile import Compiler, mentions
from tests.unit.data._support import rows_of, run


def _validate(schema: Any, on_invalid: str = "drop") -> list[dict[str, Any]]:
    return [{"op": "validate", "schema": schema, "on_invalid": on_invalid}]


def _verdicts(schema: Any, records: list[dict[str, Any]]) -> list[bool]:
    """The reference: jsonschema-rs on its linear-time regex engine, on the JSON records.

    Without regular expressions the ``jsonschema`` library must agree (their dialects of
    regular expressions differ: Python's ``re`` against Rust's ``regex``).
    """
    validator = jsonschema_rs.Draft202012Validator(
        schema, validate_formats=False, pattern_options=jsonschema_rs.RegexOptions()
    )
    verdicts = [validator.is_valid(record) for record in records]
    if not mentions(schema, {"pattern", "patternProperties"}):
        python = jsonschema.Draft202012Validator(schema)
        assert [python.is_valid(record) for record in records] == verdicts
    return verdicts


def _agrees(frame: pl.DataFrame, schema: Any, records: list[dict[str, Any]] | None = None) -> None:
    """The mask equals the reference on ``records`` (default: the frame's rows as JSON)."""
    expected = _verdicts(schema, records_for_validation(frame) if records is None else records)
    assert valid_mask(frame, schema).to_list() == expected


def test_validate_csv_values_are_strings_not_integers() -> None:
    frame = next(iter_csv_frames(io.BytesIO(b"age\n42\nx\n"), 10))
    schema = {"properties": {"age": {"type": "integer"}}}

    result = run_single(_validate(schema), frame)

    assert result.frame.height == 0
    assert result.stats["invalid"] == 2
    assert result.invalid_samples[0]["reason"] == 'age: "42" is not of type "integer"'


def test_validate_csv_digits_pass_a_pattern() -> None:
    frame = next(iter_csv_frames(io.BytesIO(b"age\n42\nx\n"), 10))
    schema = {"properties": {"age": {"type": "string", "pattern": "^[0-9]+$"}}}

    assert rows_of(run_single(_validate(schema), frame).frame) == [{"age": "42"}]


def test_validate_missing_key_differs_from_explicit_null() -> None:
    records = [{"email": "a@x"}, {"email": None}, {"other": 1}]
    schema = {"required": ["email"], "properties": {"email": {"type": ["string", "null"]}}}

    result = run(_validate(schema), records)

    assert result.stats["operations"][0]["invalid"] == 1
    assert result.invalid_samples == [
        {
            "row": 2,
            "operation": "operations[0]",
            "reason": '"email" is a required property',
            "record": {"other": 1},
        }
    ]


def test_validate_drop_counts_and_samples_first_twenty_by_row() -> None:
    records = [{"n": i} for i in range(50)]

    result = run(_validate({"properties": {"n": {"maximum": 9}}}), records)

    assert result.frame.height == 10
    assert result.stats["invalid"] == 40
    assert [s["row"] for s in result.invalid_samples] == list(range(10, 30))
    assert result.invalid_samples[0]["reason"] == "n: 10 is greater than the maximum of 9"
    assert result.invalid_frame is None


def test_validate_collect_keeps_every_invalid_row() -> None:
    records = [{"n": i} for i in range(30)]

    result = run(_validate({"properties": {"n": {"minimum": 5}}}, "collect"), records)

    assert result.frame.height == 25
    invalid = result.invalid_frame
    assert invalid is not None
    assert invalid.get_column("row").to_list() == [0, 1, 2, 3, 4]
    assert invalid.get_column("operation").unique().to_list() == ["operations[0]"]
    assert invalid.get_column("record").to_list()[0] == {"n": 0}
    assert result.as_result()["invalid_rows"][4] == {
        "row": 4,
        "operation": "operations[0]",
        "record": {"n": 4},
    }


def test_validate_fail_names_the_first_invalid_row_and_why() -> None:
    records = [{"n": 1}, {"n": 2.5}, {"n": 3.5}]

    with pytest.raises(DataError) as caught:
        run(_validate({"properties": {"n": {"type": "integer"}}}, "fail"), records)

    assert str(caught.value) == (
        'operations[0] (validate): row 1 is invalid: n: 2.5 is not of type "integer"'
    )


@pytest.mark.parametrize("schema", [False, {"type": "array"}, {"not": {}}, {"enum": [1]}])
def test_validate_schema_rejecting_everything_drops_every_row(schema: Any) -> None:
    result = run(_validate(schema), [{"a": 1}, {"b": 2}])

    assert result.frame.height == 0
    assert result.stats["invalid"] == 2
    assert len(result.invalid_samples) == 2


def test_validate_empty_input_has_nothing_invalid() -> None:
    result = run(_validate({"required": ["a"]}), [])

    assert result.stats["rows_in"] == 0
    assert result.stats["invalid"] == 0


def test_validate_lengths_count_code_points() -> None:
    records = [{"s": "👍🏽"}, {"s": "e\u0301"}, {"s": "ß"}, {"s": "abc"}]

    result = run(_validate({"properties": {"s": {"maxLength": 2}}}), records)

    assert rows_of(result.frame) == records[:3]


def test_validate_float_with_zero_fraction_is_an_integer() -> None:
    frame = frame_from_records([{"x": 1.0}, {"x": 1.5}, {"x": None}])

    assert valid_mask(frame, {"properties": {"x": {"type": "integer"}}}).to_list() == [
        True,
        False,
        False,
    ]


def test_validate_bool_is_not_a_number_and_one_is_not_true() -> None:
    frame = frame_from_records([{"b": True, "i": 1}])

    _agrees(frame, {"properties": {"b": {"type": "number"}}})
    _agrees(frame, {"properties": {"b": {"enum": [1]}, "i": {"enum": [True]}}})
    _agrees(frame, {"properties": {"i": {"const": 1.0}}})


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"s": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/s"}}},
        {"properties": {"l": {"items": {"type": "integer"}, "minItems": 2}}},
        {"properties": {"o": {"required": ["k"], "properties": {"k": {"minimum": 2}}}}},
        {"properties": {"a": {"pattern": "\\w+$"}}},
        {"properties": {"a": {"pattern": "^\\d"}}},
        {"properties": {"a": {"pattern": "[[:alpha:]]"}}},
        {"patternProperties": {"^a": {"type": "string"}}, "additionalProperties": False},
        {"properties": {"f": {"multipleOf": 0.5}}},
        {"propertyNames": {"maxLength": 1}},
        {"anyOf": [{"required": ["a"]}, {"properties": {"l": {"contains": {"const": 3}}}}]},
    ],
)
def test_validate_fallback_keywords_agree_with_jsonschema(schema: Any) -> None:
    records = [
        {"a": "xy", "l": [1, 3], "o": {"k": 3}, "f": 1.5},
        {"a": "y\n", "l": [1.5], "o": {"k": 1}, "f": 1.25},
        {"a": "é", "o": {"j": 1}, "f": None},
        {"l": [], "f": 2.0},
    ]

    _agrees(frame_from_records(records), schema)


def test_validate_dollar_matches_only_at_the_very_end() -> None:
    frame = frame_from_records([{"a": "ab\n"}, {"a": "ab\n\n"}, {"a": "ab"}])
    schema = {"properties": {"a": {"pattern": "b$"}}}

    assert valid_mask(frame, schema).to_list() == [False, False, True]
    _agrees(frame, schema)


@pytest.mark.parametrize("pattern", ["\\d", "^\\w+$", "[^\\d.]", "\\W", "^[\\w.]+@", "\\D$"])
def test_validate_ascii_classes_compile_and_agree_with_jsonschema_rs(pattern: str) -> None:
    values = ["٣", "3", "é", "_", "\u212a", "k", "ß", "a.b@x", "é.b@x", "", "-"]
    frame = frame_from_records([{"a": value} for value in values])
    schema = {"properties": {"a": {"pattern": pattern}}}
    compiler = Compiler(frame)

    compiler.row(schema)

    assert compiler.residuals == []
    _agrees(frame, schema)


# --- the compiled mask against jsonschema, on generated rows and schemas -----------------------

_FIELDS = ["a", "b", "c"]
_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.sampled_from([0.0, 1.0, -2.5, 3.25, 1e20]),
    st.sampled_from(["", "a", "ab", " a", "abc", "A1", "é", "e\u0301", "👍", "x\n", "1"]),
    # Digits and letters beyond ASCII: ``\d`` and ``\w`` are ASCII in ECMA-262.
    st.sampled_from(["٣", "\u212a", "_", "a_1", "ß"]),
    # Strings that read like the text of other kinds of values.
    st.sampled_from(["true", "1.0", "-2.5", "null", "[1]", '{"a":1}']),
    st.sampled_from([[], [1, "a"], {}, {"a": 1}]),
)
_type = st.sampled_from(["null", "boolean", "integer", "number", "string", "object", "array"])
_scalar_schema = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(_type, st.lists(_type, min_size=1, max_size=3, unique=True)),
        "enum": st.lists(_value, min_size=1, max_size=4),
        "const": _value,
        "minimum": st.integers(-3, 3),
        "exclusiveMaximum": st.sampled_from([0, 2, 2.5]),
        "minLength": st.integers(0, 3),
        "maxLength": st.integers(0, 3),
        "pattern": st.sampled_from(
            ["^a", "b$", "[0-9]", "^.$", "e", "^$", "^[a-c]+$", "1|t", "\\d", "^\\w+$", "[^\\d.]"]
        ),
        "multipleOf": st.sampled_from([1, 2, 3]),
    },
)
_value_schema = st.recursive(
    st.one_of(st.booleans(), _scalar_schema),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=2)}),
        st.fixed_dictionaries({"oneOf": st.lists(inner, min_size=1, max_size=2)}),
        st.fixed_dictionaries({"not": inner}),
        st.fixed_dictionaries({"if": inner, "then": inner}, optional={"else": inner}),
    ),
    max_leaves=3,
)
_row_schema = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["object", ["object", "null"], "array"]),
        "required": st.lists(st.sampled_from([*_FIELDS, "zz"]), max_size=2, unique=True),
        "properties": st.dictionaries(st.sampled_from(_FIELDS), _value_schema, max_size=3),
        "additionalProperties": st.one_of(st.booleans(), _scalar_schema),
        "minProperties": st.integers(0, 3),
        "maxProperties": st.integers(0, 3),
        "dependentRequired": st.dictionaries(
            st.sampled_from(_FIELDS),
            st.lists(st.sampled_from(_FIELDS), max_size=2, unique=True),
            max_size=2,
        ),
    },
)
_column_kind = st.sampled_from(["int", "float", "str", "bool", "int_str", "number_str", "any"])


@st.composite
def _records(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rows whose columns are of one JSON kind or mix kinds; keys may be missing."""
    kinds = {name: draw(_column_kind) for name in _FIELDS}
    numbers = st.sampled_from([0.0, 1.0, -2.5, 3.25, 2.0])
    texts = st.sampled_from(["", "a", "ab", " a", "é", "x\n", "1", "1.0", "true", "٣", "_"])
    pools = {
        "int": st.one_of(st.none(), st.integers(-5, 5)),
        "float": st.one_of(st.none(), numbers),
        "str": st.one_of(st.none(), texts),
        "bool": st.one_of(st.none(), st.booleans()),
        "int_str": st.one_of(st.none(), st.integers(-5, 5), texts),
        "number_str": st.one_of(st.integers(-5, 5), numbers, texts, st.booleans()),
        "any": _value,
    }
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        keys = draw(st.lists(st.sampled_from(_FIELDS), unique=True, max_size=3))
        rows.append({k: draw(pools[kinds[k]]) for k in keys})
    return rows


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=_records(), schema=_row_schema, csv=st.booleans())
@example(records=[{"a": 1}, {"a": "1"}], schema={"properties": {"a": {"enum": [1]}}}, csv=False)
def test_compiled_mask_equals_jsonschema_verdict(
    records: list[dict[str, Any]], schema: dict[str, Any], csv: bool
) -> None:
    frame = frame_from_records(records)
    if csv and not any(isinstance(t, pl.List | pl.Struct) for t in frame.schema.values()):
        # As a CSV gives it: every column present, every value a string.
        frame = frame.select(
            [pl.col(c).cast(pl.String).fill_null("") for c in frame.columns if "__" not in c]
        )
        _agrees(frame, schema)
    else:
        # Judged on the records themselves: a column mixing kinds keeps each value's kind.
        _agrees(frame, schema, records)
