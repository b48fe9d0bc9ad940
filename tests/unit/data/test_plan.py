"""Batches and the merge: a batched run equals a one-batch run, for every pipeline."""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks_app.data import (
    BatchResult,
    Compression,
    DataError,
    Plan,
    frame_from_records,
    infer_schema,
    run_single,
)
from tasks_app.data.core import has_column, kind_column
from tests.unit.data._support import assert_same, batched

PIPELINE = [
    {"op": "validate", "schema": {"required": ["email"]}, "on_invalid": "collect"},
    {
        "op": "clean",
        "trim": True,
        "lower": ["email"],
        "empty_as_null": True,
        "drop_null": ["email"],
    },
    {"op": "cast", "fields": {"age": "int"}},
    {"op": "filter", "where": {"field": "age", "gte": 18}},
    {"op": "dedupe", "keys": ["email"], "keep": "last"},
    {"op": "sort", "by": [{"field": "amount", "desc": True}]},
    {
        "op": "aggregate",
        "group_by": ["country"],
        "metrics": {"n": {"count": "*"}, "total": {"sum": "amount"}, "age": {"avg": "age"}},
    },
    {"op": "limit", "n": 2},
]
PEOPLE = [
    {
        "email": f" P{i % 7}@x ",
        "age": str(15 + i % 9),
        "country": "DE FR IT".split()[i % 3],
        "amount": i * 0.5,
    }
    for i in range(40)
] + [{"age": "30", "country": "DE", "amount": 1.0}, {"email": "x@y", "age": "old"}]


@pytest.mark.parametrize("size", [1, 3, 7, 41, 100])
def test_merge_equals_single_run_for_the_design_pipeline(size: int) -> None:
    expected = run_single(PIPELINE, frame_from_records(PEOPLE))

    assert_same(batched(PIPELINE, PEOPLE, size), expected)
    assert expected.stats["invalid"] == 2


def test_plan_splits_at_the_first_global_operation() -> None:
    assert Plan.from_operations(PIPELINE).split == 4
    assert Plan.from_operations(PIPELINE[:4]).split == 4


def test_plan_from_bad_operations_fails_naming_the_path() -> None:
    with pytest.raises(DataError, match=r"operations\[0\]\.n: this field is required"):
        Plan.from_operations([{"op": "limit"}])


def test_batch_of_sort_then_limit_keeps_only_the_top_rows() -> None:
    plan = Plan.from_operations([{"op": "sort", "by": [{"field": "v"}]}, {"op": "limit", "n": 2}])

    part = plan.run_batch(frame_from_records([{"v": 5}, {"v": 1}, {"v": 3}]), first_row=0)

    assert part.frame.get_column("v").to_list() == [1, 3]


def test_batch_of_aggregate_holds_one_row_per_group() -> None:
    plan = Plan.from_operations(
        [{"op": "aggregate", "group_by": ["g"], "metrics": {"d": {"count_distinct": "v"}}}]
    )

    part = plan.run_batch(
        frame_from_records([{"g": i % 2, "v": i % 3} for i in range(99)]), first_row=0
    )

    assert part.frame.height == 2


@pytest.mark.parametrize("compression", ["lz4", "uncompressed"])
def test_batch_result_round_trips_through_a_file(compression: Compression) -> None:
    # Given a batch result with kept and collected invalid rows
    plan = Plan.from_operations(
        [{"op": "validate", "schema": {"required": ["a"]}, "on_invalid": "collect"}]
    )
    records = [{"a": 1, "o": {"k": [1.5]}, "n": None}, {"o": None}, {"a": 2}]
    part = plan.run_batch(frame_from_records(records), first_row=10)

    # When it is written with or without compression and read back
    buffer = io.BytesIO()
    part.write(buffer, compression)
    buffer.seek(0)
    back = BatchResult.read(buffer)

    # Then it is the same result

    assert_frame_equal(back.frame, part.frame)
    assert (
        back.stats
        == part.stats
        == {
            "rows_in": 3,
            "operations": [{"op": "validate", "rows_in": 3, "rows_out": 2, "invalid": 1}],
        }
    )
    assert back.invalid_samples == part.invalid_samples
    assert back.invalid_samples[0]["row"] == 11
    assert back.invalid_frame is not None and part.invalid_frame is not None
    assert_frame_equal(back.invalid_frame, part.invalid_frame)


def test_batch_result_read_refuses_other_files() -> None:
    with pytest.raises(ValueError, match="not a batch result"):
        BatchResult.read(io.BytesIO(b"PK\x03\x04 something else"))


def test_merge_without_batches_runs_over_no_rows() -> None:
    plan = Plan.from_operations([{"op": "aggregate", "metrics": {"n": {"count": "*"}}}])

    result = plan.merge([], batches=0)

    assert result.frame is not None
    assert result.frame.to_dicts() == [{"n": 0}]
    assert result.stats["rows_in"] == 0
    assert result.stats["batches"] == 0


def test_merge_with_missing_batches_fails() -> None:
    plan = Plan.from_operations([])
    part = plan.run_batch(frame_from_records([{"a": 1}]), first_row=0)

    with pytest.raises(ValueError, match="1 batch results for 2 batches"):
        plan.merge([part], batches=2)


def test_merge_streams_rows_to_an_output_file() -> None:
    plan = Plan.from_operations([{"op": "cast", "fields": {"v": "int"}, "on_invalid": "collect"}])
    schema = infer_schema([{"v": "1"}])
    parts = (
        plan.run_batch(frame_from_records([{"v": str(i)}, {"v": "x"}], schema), first_row=2 * i)
        for i in range(3)
    )
    output, invalid = io.BytesIO(), io.BytesIO()

    result = plan.merge(
        parts, batches=3, output=output, output_format="json", invalid_output=invalid
    )

    assert result.frame is None
    assert json.loads(output.getvalue()) == [{"v": 0}, {"v": 1}, {"v": 2}]
    assert result.stats["rows_out"] == 3
    assert [json.loads(line) for line in invalid.getvalue().splitlines()] == [
        {"row": row, "operation": "operations[0]", "record": {"v": "x"}} for row in (1, 3, 5)
    ]


def test_merge_with_global_operation_writes_the_final_rows() -> None:
    plan = Plan.from_operations([{"op": "sort", "by": [{"field": "v", "desc": True}]}])
    parts = [plan.run_batch(frame_from_records([{"v": i}]), first_row=i) for i in range(3)]
    output = io.BytesIO()

    result = plan.merge(parts, batches=3, output=output, output_format="csv")

    assert output.getvalue() == b"v\n2\n1\n0\n"
    assert result.stats["rows_out"] == 3


def test_merge_stats_add_up_over_batches() -> None:
    ops = [{"op": "filter", "where": {"field": "v", "gt": 1}}, {"op": "limit", "n": 1}]

    result = batched(ops, [{"v": i} for i in range(5)], 2)

    assert result.stats == {
        "rows_in": 5,
        "rows_out": 1,
        "invalid": 0,
        "batches": 3,
        "operations": [
            {"op": "filter", "rows_in": 5, "rows_out": 3},
            {"op": "limit", "rows_in": 3, "rows_out": 1},
        ],
    }


def test_invalid_samples_are_the_first_twenty_over_all_batches() -> None:
    ops = [{"op": "validate", "schema": {"properties": {"v": {"maximum": -1}}}}]

    result = batched(ops, [{"v": i} for i in range(100)], 7)

    assert [s["row"] for s in result.invalid_samples] == list(range(20))


def test_batched_rows_keep_their_hidden_columns_out_of_results() -> None:
    result = batched([{"op": "sort", "by": [{"field": "a"}]}], [{"a": 2}, {"b": 1}], 1)

    assert result.frame is not None
    assert result.frame.columns == ["a", "b"]
    assert result.as_result()["rows"] == [{"a": 2, "b": None}, {"a": None, "b": 1}]
    assert pl.DataFrame(result.as_result()["rows"]).columns == ["a", "b"]


def test_sort_then_limit_stats_count_every_sorted_row() -> None:
    ops = [{"op": "sort", "by": [{"field": "v"}]}, {"op": "limit", "n": 2}]

    result = batched(ops, [{"v": i % 5} for i in range(12)], 5)

    assert result.stats["operations"] == [
        {"op": "sort", "rows_in": 12, "rows_out": 12},
        {"op": "limit", "rows_in": 12, "rows_out": 2},
    ]


def test_a_batch_reads_only_the_columns_its_operations_need() -> None:
    # Given a filter, a clean and a dedupe feeding an aggregate, over a staged input with more
    plan = Plan.from_operations(
        [
            {"op": "filter", "where": {"field": "a", "eq": 1}},
            {"op": "clean", "trim": True, "lower": ["b"]},
            {"op": "dedupe", "keys": ["c"]},
            {"op": "aggregate", "group_by": ["d"], "metrics": {"n": {"count": "*"}}},
        ]
    )
    columns = ["a", "b", "c", "d", "e", has_column("c"), kind_column("c"), has_column("e")]

    # When the batch asks which columns to read
    wanted = plan.input_columns(columns)

    # Then it is the fields they name with their hidden companions, in the file's order
    assert wanted == ["a", "b", "c", "d", has_column("c"), kind_column("c")]


@pytest.mark.parametrize(
    "operations",
    [
        [{"op": "validate", "schema": {"required": ["a"]}}, {"op": "select", "fields": ["a"]}],
        [{"op": "cast", "fields": {"a": "int"}}, {"op": "dedupe", "keys": ["a"]}],
        [{"op": "rename", "fields": {"a": "b"}}, {"op": "select", "fields": ["b"]}],
        [{"op": "filter", "where": {"field": "a", "eq": 1}}],
        [{"op": "dedupe", "keys": ["a"]}],
    ],
    ids=["validate-samples", "cast-samples", "rename", "whole-rows-out", "dedupe-rows-out"],
)
def test_a_batch_reads_every_column_when_whole_rows_may_show(
    operations: list[dict[str, Any]],
) -> None:
    # Given operations whose samples or output rows hold every field, or that move names
    plan = Plan.from_operations(operations)

    # When the batch asks which columns to read, then it reads them all
    assert plan.input_columns(["a", "b", "c"]) is None


def test_a_batch_reads_one_column_at_least_for_its_row_count() -> None:
    # Given an aggregate that counts rows and reads no field
    plan = Plan.from_operations([{"op": "aggregate", "metrics": {"n": {"count": "*"}}}])

    # When the batch asks which columns to read, then it reads one (rows_in stays right)
    assert plan.input_columns(["a", "b"]) == ["a"]
