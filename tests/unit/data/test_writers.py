"""Writers: strict JSON out, CSV with nested values as JSON text, no hidden columns."""

from __future__ import annotations

import datetime as dt
import io
import json

import polars as pl
import pytest

from tasks_app.data import RowWriter, to_records, write_rows


@pytest.fixture
def frame() -> pl.DataFrame:
    moment = dt.datetime(2024, 1, 2, 3, 4, 5, 120, tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "f": [1.5, float("nan"), float("inf")],
            "d": [dt.date(2024, 1, 2), None, None],
            "t": [moment, moment.replace(microsecond=0), None],
            "s": ["Straße", "👍", None],
            "o": [{"k": 1}, None, {"k": None}],
            "l": [[1, 2], [], None],
            "__qw_row": [0, 1, 2],
        }
    )


def test_to_records_values_are_strict_json(frame: pl.DataFrame) -> None:
    records = to_records(frame)

    assert records[0] == {
        "f": 1.5,
        "d": "2024-01-02",
        "t": "2024-01-02T03:04:05.000120+00:00",
        "s": "Straße",
        "o": {"k": 1},
        "l": [1, 2],
    }
    assert records[1]["f"] is None
    assert records[1]["t"] == "2024-01-02T03:04:05+00:00"
    assert records[2]["f"] is None
    json.dumps(records, allow_nan=False)


def test_write_rows_jsonl_is_one_strict_object_per_line(frame: pl.DataFrame) -> None:
    out = io.BytesIO()

    write_rows(frame, out, "jsonl")

    lines = out.getvalue().decode().splitlines()
    parsed = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert parsed == to_records(frame)


def test_write_rows_json_is_an_array(frame: pl.DataFrame) -> None:
    out = io.BytesIO()

    write_rows(frame, out, "json")

    assert json.loads(out.getvalue()) == to_records(frame)


def test_write_rows_csv_writes_nested_values_as_json_text(frame: pl.DataFrame) -> None:
    out = io.BytesIO()

    write_rows(frame, out, "csv")

    lines = out.getvalue().decode().splitlines()
    assert lines[0] == "f,d,t,s,o,l"
    assert lines[1] == '1.5,2024-01-02,2024-01-02T03:04:05.000120+00:00,Straße,"{""k"":1}","[1,2]"'
    assert lines[2] == ",,2024-01-02T03:04:05+00:00,👍,,[]"


def test_row_writer_joins_frames_into_one_document() -> None:
    part = pl.DataFrame({"a": [1, 2], "__qw_row": [0, 1]})

    outputs = {}
    for fmt in ("jsonl", "json", "csv"):
        out = io.BytesIO()
        with RowWriter(out, fmt) as writer:  # type: ignore[arg-type]
            writer.write(part)
            writer.write(part.head(0))
            writer.write(part)
        outputs[fmt] = out.getvalue().decode()

    assert outputs["jsonl"] == '{"a":1}\n{"a":2}\n{"a":1}\n{"a":2}\n'
    assert json.loads(outputs["json"]) == [{"a": 1}, {"a": 2}, {"a": 1}, {"a": 2}]
    assert outputs["csv"] == "a\n1\n2\n1\n2\n"


def test_row_writer_without_rows_writes_an_empty_document() -> None:
    json_out, csv_out = io.BytesIO(), io.BytesIO()

    write_rows(pl.DataFrame(), json_out, "json")
    write_rows(pl.DataFrame({"a": []}), csv_out, "csv")

    assert json_out.getvalue() == b"[]"
    assert csv_out.getvalue() == b"a\n"


def test_row_writer_unknown_format_fails() -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        RowWriter(io.BytesIO(), "xml")  # type: ignore[arg-type]
