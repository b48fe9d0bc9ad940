"""``dedupe``, ``sort``, ``aggregate`` and ``limit`` on one batch."""

from __future__ import annotations

import pytest

from tasks_app.data import DataError
from tests.unit.data._support import rows_of, run


def test_dedupe_keep_first_keeps_input_order() -> None:
    records = [{"k": 2, "i": 0}, {"k": 1, "i": 1}, {"k": 2, "i": 2}, {"k": 1, "i": 3}]

    result = run([{"op": "dedupe", "keys": ["k"]}], records)

    assert [r["i"] for r in rows_of(result.frame)] == [0, 1]
    assert result.stats["operations"] == [{"op": "dedupe", "rows_in": 4, "rows_out": 2}]


def test_dedupe_keep_last_keeps_the_last_rows_where_they_stood() -> None:
    records = [{"k": 1, "i": 0}, {"k": 2, "i": 1}, {"k": 1, "i": 2}]

    result = run([{"op": "dedupe", "keys": ["k"], "keep": "last"}], records)

    assert [r["i"] for r in rows_of(result.frame)] == [1, 2]


def test_dedupe_nulls_and_missing_keys_are_equal() -> None:
    records = [{"k": None, "i": 0}, {"i": 1}, {"k": 1, "i": 2}]

    result = run([{"op": "dedupe", "keys": ["k", "ghost"]}], records)

    assert [r["i"] for r in rows_of(result.frame)] == [0, 2]


def test_sort_is_stable_with_nulls_last_both_ways() -> None:
    records = [{"a": 2, "i": 0}, {"a": None, "i": 1}, {"a": 1, "i": 2}, {"a": 2, "i": 3}]

    up = run([{"op": "sort", "by": [{"field": "a"}]}], records)
    down = run([{"op": "sort", "by": [{"field": "a", "desc": True}]}], records)

    assert [r["i"] for r in rows_of(up.frame)] == [2, 0, 3, 1]
    assert [r["i"] for r in rows_of(down.frame)] == [0, 3, 2, 1]


def test_sort_by_several_fields_and_text_in_code_point_order() -> None:
    records = [{"g": "b", "n": "é"}, {"g": "a", "n": "z"}, {"g": "b", "n": "Z"}]
    op = {"op": "sort", "by": [{"field": "g", "desc": True}, {"field": "n"}]}

    assert rows_of(run([op], records).frame) == [
        {"g": "b", "n": "Z"},
        {"g": "b", "n": "é"},
        {"g": "a", "n": "z"},
    ]


def test_aggregate_groups_in_order_of_first_appearance() -> None:
    records = [
        {"c": "FR", "amount": 2, "age": 30, "email": "a"},
        {"c": "DE", "amount": 1, "age": None, "email": "b"},
        {"c": "FR", "amount": None, "age": 40, "email": "a"},
        {"c": None, "amount": 5, "age": 20, "email": None},
    ]
    op = {
        "op": "aggregate",
        "group_by": ["c"],
        "metrics": {
            "rows": {"count": "*"},
            "ages": {"count": "age"},
            "total": {"sum": "amount"},
            "mean_age": {"avg": "age"},
            "low": {"min": "age"},
            "high": {"max": "email"},
            "people": {"count_distinct": "email"},
        },
    }

    result = run([op], records)

    assert rows_of(result.frame) == [
        {
            "c": "FR",
            "rows": 2,
            "ages": 2,
            "total": 2,
            "mean_age": 35.0,
            "low": 30,
            "high": "a",
            "people": 1,
        },
        {
            "c": "DE",
            "rows": 1,
            "ages": 0,
            "total": 1,
            "mean_age": None,
            "low": None,
            "high": "b",
            "people": 1,
        },
        {
            "c": None,
            "rows": 1,
            "ages": 1,
            "total": 5,
            "mean_age": 20.0,
            "low": 20,
            "high": None,
            "people": 0,
        },
    ]


def test_aggregate_without_group_by_gives_one_row_even_for_no_input() -> None:
    op = {
        "op": "aggregate",
        "metrics": {
            "n": {"count": "*"},
            "s": {"sum": "x"},
            "a": {"avg": "x"},
            "m": {"max": "x"},
            "d": {"count_distinct": "x"},
        },
    }

    assert rows_of(run([op], []).frame) == [{"n": 0, "s": 0, "a": None, "m": None, "d": 0}]
    assert rows_of(run([op], [{"x": 1.5}, {"x": 1.5}]).frame) == [
        {"n": 2, "s": 3.0, "a": 1.5, "m": 1.5, "d": 1}
    ]


def test_aggregate_with_group_by_on_no_input_gives_no_rows() -> None:
    op = {"op": "aggregate", "group_by": ["c"], "metrics": {"n": {"count": "*"}}}

    result = run([op], [])

    assert result.frame.height == 0
    assert result.frame.columns == ["c", "n"]


def test_aggregate_sum_of_text_says_to_cast_first() -> None:
    op = {"op": "aggregate", "metrics": {"total": {"sum": "amount"}}}

    with pytest.raises(DataError, match=r"operations\[0\]\.metrics\.total: .*cast it first"):
        run([op], [{"amount": "12"}])


def test_aggregate_min_of_a_list_fails() -> None:
    op = {"op": "aggregate", "metrics": {"m": {"min": "l"}}}

    with pytest.raises(DataError, match="has no order"):
        run([op], [{"l": [1]}])


def test_limit_keeps_the_first_rows() -> None:
    result = run([{"op": "limit", "n": 2}], [{"i": i} for i in range(5)])

    assert rows_of(result.frame) == [{"i": 0}, {"i": 1}]
    assert result.stats["rows_out"] == 2


def test_limit_zero_keeps_nothing() -> None:
    assert run([{"op": "limit", "n": 0}], [{"i": 1}]).frame.height == 0


def test_operations_after_aggregate_see_its_rows() -> None:
    ops = [
        {"op": "aggregate", "group_by": ["c"], "metrics": {"n": {"count": "*"}}},
        {"op": "validate", "schema": {"properties": {"n": {"minimum": 2}}}},
        {"op": "sort", "by": [{"field": "n", "desc": True}]},
    ]

    result = run(ops, [{"c": "a"}, {"c": "b"}, {"c": "b"}])

    assert rows_of(result.frame) == [{"c": "b", "n": 2}]
    assert result.invalid_samples == [
        {
            "row": 0,
            "operation": "operations[1]",
            "reason": "n: 1 is less than the minimum of 2",
            "record": {"c": "a", "n": 1},
        }
    ]


def test_empty_input_without_columns_runs_every_operation() -> None:
    ops = [
        {"op": "validate", "schema": {"type": "object"}},
        {"op": "clean", "trim": True, "drop_null": ["a"]},
        {"op": "rename", "fields": {"a": "b"}},
        {"op": "cast", "fields": {"b": "int"}},
        {"op": "filter", "where": {"field": "b", "gt": 1}},
        {"op": "dedupe", "keys": ["b"]},
        {"op": "sort", "by": [{"field": "b"}]},
        {"op": "limit", "n": 3},
    ]

    result = run(ops, [])

    assert result.frame.height == 0
    assert result.stats["rows_in"] == 0
    assert [s["rows_out"] for s in result.stats["operations"]] == [0] * len(ops)
