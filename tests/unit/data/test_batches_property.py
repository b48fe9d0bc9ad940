"""The property: any records, any pipeline, any batch size — batches merge to the single run."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks_app.data import DataError, frame_from_records, infer_schema, run_single
from tests.unit.data._support import assert_same, batched

_KEYS = ["k", "s", "x", "b"]
# Dyadic numbers: their sums and averages are exact in binary floating point, whatever order.
_POOLS: dict[str, Any] = {
    "k": st.one_of(st.none(), st.integers(0, 3)),
    "s": st.one_of(st.none(), st.sampled_from(["", " a", "A", "b ", "ß", "Straße", "👍", "a"])),
    "x": st.one_of(st.none(), st.sampled_from([0, 1, -1, 2.5, 0.5, -0.25])),
    "b": st.one_of(st.none(), st.booleans()),
}
_field = st.sampled_from(_KEYS)
_fields = st.lists(_field, min_size=1, max_size=3, unique=True)
_condition = st.sampled_from(
    [
        {"field": "k", "gte": 1},
        {"field": "k", "in": [0, 3]},
        {"field": "s", "contains": "a"},
        {"field": "s", "ne": "A"},
        {"field": "x", "lt": 0.5},
        {"field": "b", "eq": True},
        {"field": "x", "is_null": False},
    ]
)
_where = st.one_of(
    _condition,
    st.builds(lambda c: {"any": c}, st.lists(_condition, max_size=3)),
    st.builds(lambda c: {"all": c}, st.lists(_condition, max_size=3)),
)
_on_invalid = st.sampled_from(["drop", "collect", "drop", "fail"])
_metrics = {
    "n": {"count": "*"},
    "c": {"count": "x"},
    "sx": {"sum": "x"},
    "ax": {"avg": "x"},
    "mn": {"min": "s"},
    "mx": {"max": "k"},
    "d": {"count_distinct": "s"},
}
_operation = st.one_of(
    st.builds(
        lambda schema, mode: {"op": "validate", "schema": schema, "on_invalid": mode},
        st.sampled_from(
            [
                {"required": ["k"]},
                {"properties": {"x": {"minimum": 0}}},
                {"properties": {"s": {"minLength": 1, "pattern": "^[a-z ]"}}},
                {"properties": {"k": {"type": "integer"}, "b": {"const": True}}},
                {"anyOf": [{"required": ["s"]}, {"properties": {"n": {"minimum": 2}}}]},
                # Gives a column of mixed kinds one type, the same in every batch.
                {"properties": {"k": {"type": ["integer", "null"]}, "x": {"type": "number"}}},
            ]
        ),
        _on_invalid,
    ),
    st.builds(
        lambda trim, lower, empty, drop: {
            "op": "clean",
            "trim": trim,
            "lower": lower,
            "upper": [],
            "empty_as_null": empty,
            "drop_null": drop,
        },
        st.booleans(),
        st.sampled_from([[], ["s"]]),
        st.booleans(),
        st.lists(_field, max_size=2, unique=True),
    ),
    st.builds(
        lambda m: {"op": "rename", "fields": m},
        st.sampled_from([{"s": "t"}, {"x": "k"}, {"k": "s", "s": "k"}]),
    ),
    st.builds(lambda f: {"op": "select", "fields": f}, _fields),
    st.builds(
        lambda f, mode: {"op": "cast", "fields": f, "on_invalid": mode},
        st.sampled_from([{"k": "str"}, {"x": "int"}, {"s": "int"}, {"b": "int", "k": "float"}]),
        _on_invalid,
    ),
    st.builds(lambda w: {"op": "filter", "where": w}, _where),
    st.builds(
        lambda keys, keep: {"op": "dedupe", "keys": keys, "keep": keep},
        _fields,
        st.sampled_from(["first", "last"]),
    ),
    st.builds(
        lambda by: {"op": "sort", "by": by},
        st.lists(
            st.builds(lambda f, d: {"field": f, "desc": d}, _field, st.booleans()),
            min_size=1,
            max_size=2,
        ),
    ),
    st.builds(
        lambda group_by, names: {
            "op": "aggregate",
            "group_by": group_by,
            "metrics": {n: _metrics[n] for n in names},
        },
        st.lists(_field, max_size=2, unique=True),
        st.lists(st.sampled_from(list(_metrics)), min_size=1, max_size=3, unique=True),
    ),
    st.builds(lambda n: {"op": "limit", "n": n}, st.integers(0, 6)),
)


@st.composite
def _records(draw: st.DrawFn) -> list[dict[str, Any]]:
    rows = []
    for _ in range(draw(st.integers(0, 24))):
        keys = draw(st.lists(_field, unique=True, max_size=4))
        row = {key: draw(_POOLS[key]) for key in keys}
        if "k" in row and draw(st.integers(0, 10)) == 0:
            row["k"] = "mixed"  # the whole column becomes text
        rows.append(row)
    return rows


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=_records(),
    operations=st.lists(_operation, max_size=5),
    size=st.integers(1, 25),
)
def test_merged_batches_equal_single_run(
    records: list[dict[str, Any]], operations: list[dict[str, Any]], size: int
) -> None:
    schema = infer_schema(records)
    try:
        expected = run_single(operations, frame_from_records(records, schema))
    except DataError:
        with pytest.raises(DataError):
            batched(operations, records, size)
        return

    assert_same(batched(operations, records, size), expected)
