"""Helpers shared by the data-engine tests."""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

from tasks_app.data import (
    BatchResult,
    MergeResult,
    Plan,
    Schema,
    frame_from_records,
    infer_schema,
    run_single,
)
from tasks_app.data.rowwise import with_row_numbers


def rows_of(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("__qw_")} for row in frame.to_dicts()]


def run(operations: list[dict[str, Any]], records: list[dict[str, Any]]) -> Any:
    return run_single(operations, frame_from_records(records))


def numbered(records: list[dict[str, Any]]) -> pl.DataFrame:
    return with_row_numbers(frame_from_records(records), 0)


def round_trip(part: BatchResult) -> BatchResult:
    buffer = io.BytesIO()
    part.write(buffer)
    buffer.seek(0)
    return BatchResult.read(buffer)


def staged(plan: Plan, records: list[dict[str, Any]], schema: Schema) -> pl.DataFrame:
    """A batch's input as ``tasks_app.batches`` stages and reads it (an Arrow IPC file)."""
    buffer = io.BytesIO()
    frame_from_records(records, schema).write_ipc(buffer)
    buffer.seek(0)
    columns = plan.input_columns(pl.read_ipc_schema(buffer))
    buffer.seek(0)
    return pl.read_ipc(buffer, columns=columns)


def batched(
    operations: list[dict[str, Any]], records: list[dict[str, Any]], size: int
) -> MergeResult:
    """Run as the plumbing does: one schema, batches staged as Arrow files and read back with
    only the columns the plan needs, results through files, then the merge."""
    schema = Schema.from_json(json.dumps(infer_schema(records).to_json()))
    plan = Plan.from_operations(operations)
    parts = [
        round_trip(plan.run_batch(staged(plan, records[i : i + size], schema), first_row=i))
        for i in range(0, len(records), size)
    ]
    return plan.merge(iter(parts), batches=len(parts))


def assert_same(got: MergeResult, expected: MergeResult) -> None:
    assert got.frame is not None and expected.frame is not None
    assert_frame_equal(got.frame, expected.frame)
    assert {**got.stats, "batches": 1} == expected.stats
    assert got.invalid_samples == expected.invalid_samples
    if expected.invalid_frame is None:
        assert got.invalid_frame is None
    else:
        assert got.invalid_frame is not None
        assert got.invalid_frame.to_dicts() == expected.invalid_frame.to_dicts()
