"""Byte ranges of a CSV file: each batch parses its own range, with the serial reader's rows."""

from __future__ import annotations

import io
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks_app.data import (
    DataError,
    Plan,
    csv_layout,
    iter_csv_frames,
    read_csv_range,
    readers,
    run_single,
)
from tests.unit.data._support import assert_same, round_trip


def _serial(body: bytes, size: int) -> list[pl.DataFrame] | type[DataError]:
    try:
        return list(iter_csv_frames(io.BytesIO(body), size))
    except DataError:
        return DataError


def _ranged(body: bytes, size: int, scan_bytes: int) -> list[pl.DataFrame] | type[DataError] | None:
    file = io.BytesIO(body)
    try:
        layout = csv_layout(file, size, scan_bytes=scan_bytes)
    except DataError:
        return DataError
    if layout is None:
        return None
    frames = []
    for part in layout.ranges:
        try:
            frame = read_csv_range(
                file, layout.header_start, layout.header_end, part.start, part.end, part.first_row
            )
        except DataError:
            return DataError
        assert frame.height == part.rows, (part, frame)
        frames.append(frame)
    assert sum(part.rows for part in layout.ranges) == layout.rows
    return frames


_fields = st.sampled_from(["a", "b", "", " ", "x y", '"q"', '"a,b"', '"l1\nl2"', '"\r\n"', "ß"])
_line = st.one_of(st.lists(_fields, min_size=1, max_size=3).map(",".join), st.just("1,2,3,4"))
_ending = st.sampled_from(["\n", "\r\n", "\n", "\n\n", "\r\n\r\n", "\n\r\n", "\n \n"])


@st.composite
def _csv(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(["", "\ufeff", "\n", "\r\n\n"])) + "h1,h2,h3\n"
    for _ in range(draw(st.integers(0, 30))):
        text += draw(_line) + draw(_ending)
    text += draw(st.sampled_from(["", "last", " ", "x,y", "\r"]))
    return text.encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=_csv(),
    size=st.integers(1, 8),
    scan_bytes=st.sampled_from([4, 16, 64, 1 << 16]),
    whole=st.booleans(),
)
def test_ranges_read_the_same_frames_as_the_serial_reader(
    body: bytes, size: int, scan_bytes: int, whole: bool
) -> None:
    # Given a CSV file cut into ranges, each read in one piece or streamed in small pieces
    expected = _serial(body, size)
    limit = readers.WHOLE_RANGE_BYTES if whole else 0
    with mock.patch.object(readers, "WHOLE_RANGE_BYTES", limit):
        got = _ranged(body, size, scan_bytes)
    # Then the ranges hold the frames the serial reader gives, or fail as it does
    if got is None:  # left to the serial reader
        return
    assert (got is DataError) == (expected is DataError), (body, got, expected)
    if not isinstance(expected, list) or not isinstance(got, list):
        return
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.equals(theirs), (body, mine, theirs)


def test_quoted_newlines_are_never_a_cut() -> None:
    rows = [f'{i},"line one\nline two, {i}"' for i in range(10)]
    body = ("id,note\n" + "\n".join(rows) + "\n").encode()
    layout = csv_layout(io.BytesIO(body), 3, scan_bytes=8)
    assert layout is not None
    assert [(part.first_row, part.rows) for part in layout.ranges] == [
        (0, 3),
        (3, 3),
        (6, 3),
        (9, 1),
    ]
    frames = [
        read_csv_range(io.BytesIO(body), layout.header_start, layout.header_end, p.start, p.end)
        for p in layout.ranges
    ]
    assert pl.concat(frames)["note"].to_list() == [f"line one\nline two, {i}" for i in range(10)]


@pytest.mark.parametrize(
    "body",
    [b"", b"\n\n", b"h1,h2", b'h1,h2\n1,"open\n2,3\n'],
    ids=["empty", "blank", "header-without-newline", "open-quote"],
)
def test_files_left_to_the_serial_reader(body: bytes) -> None:
    assert csv_layout(io.BytesIO(body), 2) is None


def test_the_batch_size_may_be_raised_once_the_rows_are_counted() -> None:
    body = ("a\n" + "".join(f"{i}\n" for i in range(10))).encode()
    layout = csv_layout(io.BytesIO(body), 1, size_for=lambda rows: -(-rows // 4))
    assert layout is not None
    assert layout.rows == 10 and layout.batch_size == 3
    assert [part.rows for part in layout.ranges] == [3, 3, 3, 1]


def test_a_bad_header_fails_as_it_would_serially() -> None:
    with pytest.raises(DataError, match="duplicate column"):
        csv_layout(io.BytesIO(b"a,a\n1,2\n"), 2)


_CSV_OPERATIONS = st.sampled_from(
    [
        {"op": "clean", "trim": True, "lower": ["k"], "empty_as_null": True},
        {"op": "validate", "schema": {"properties": {"s": {"pattern": "^[a-z]"}}}},
        {"op": "validate", "schema": {"required": ["k"]}, "on_invalid": "collect"},
        {"op": "cast", "fields": {"k": "int"}, "on_invalid": "drop"},
        {"op": "filter", "where": {"field": "s", "contains": "a"}},
        {"op": "dedupe", "keys": ["k"], "keep": "first"},
        {"op": "dedupe", "keys": ["k", "s"], "keep": "last"},
        {"op": "sort", "by": [{"field": "s", "desc": True}]},
        {"op": "aggregate", "group_by": ["k"], "metrics": {"n": {"count": "*"}}},
        {"op": "limit", "n": 3},
    ]
)
_cell = st.sampled_from(["", "a", "A ", "b", "1", "2", '"x\ny"', '"a,b"', " 1"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(st.tuples(_cell, _cell, st.sampled_from(["\n", "\r\n", "\n\n"])), max_size=30),
    operations=st.lists(_CSV_OPERATIONS, max_size=4),
    size=st.integers(1, 7),
    scan_bytes=st.sampled_from([8, 64, 1 << 16]),
)
def test_a_pipeline_over_byte_ranges_equals_one_run_over_the_whole_file(
    lines: list[tuple[str, str, str]], operations: list[dict[str, Any]], size: int, scan_bytes: int
) -> None:
    body = ("k,s\n" + "".join(f"{k},{s}{end}" for k, s, end in lines)).encode()
    whole = pl.concat(list(iter_csv_frames(io.BytesIO(body), 1 << 30)))
    try:
        expected = run_single(operations, whole)
    except DataError:
        expected = None
    file = io.BytesIO(body)
    layout = csv_layout(file, size, scan_bytes=scan_bytes)
    assert layout is not None
    assert layout.rows == whole.height
    plan = Plan.from_operations(operations)
    try:
        parts = [
            round_trip(
                plan.run_batch(
                    read_csv_range(
                        file, layout.header_start, layout.header_end, r.start, r.end, r.first_row
                    ),
                    first_row=r.first_row,
                )
            )
            for r in layout.ranges
        ]
        got = plan.merge(iter(parts), batches=len(parts))
    except DataError:
        assert expected is None
        return
    assert expected is not None
    assert_same(got, expected)
    assert got.stats["batches"] == max(1, -(-whole.height // size))
