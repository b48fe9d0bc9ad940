"""Results out: inline records and streamed files, always strict JSON (or plain CSV).

Values are written as JSON can hold them: a date as ``"YYYY-MM-DD"``, a datetime in ISO 8601
(``2024-01-02T03:04:05+00:00``, microseconds only when not zero), NaN and ±infinity as null.
In CSV a null is an empty field and nested values (objects, lists) are their JSON text.
Hidden columns never leave the engine.
"""

from __future__ import annotations

import io
from types import TracebackType
from typing import IO, Any, Literal

import polars as pl

from tasks_app.data.core import strip_hidden

OutputFormat = Literal["jsonl", "csv", "json"]
FORMATS = ("jsonl", "csv", "json")


def datetime_text(col: pl.Expr, dtype: pl.Datetime) -> pl.Expr:
    if dtype.time_zone and dtype.time_zone != "UTC":
        col = col.dt.convert_time_zone("UTC")
    whole = col.dt.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = (
        pl.when(col.dt.microsecond() != 0).then(col.dt.strftime("%.6f")).otherwise(pl.lit(""))
    )
    offset = pl.lit("+00:00" if dtype.time_zone else "")
    return pl.concat_str([whole, fraction, offset])


def _json_value(name: str, dtype: pl.DataType) -> pl.Expr | None:
    """An expression giving the column as JSON can hold it; None when it already can."""
    col = pl.col(name)
    if dtype == pl.Date:
        return col.dt.strftime("%Y-%m-%d")
    if isinstance(dtype, pl.Datetime):
        return datetime_text(col, dtype)
    if dtype in (pl.Float32, pl.Float64):
        return pl.when(col.is_finite()).then(col).otherwise(None)
    if isinstance(dtype, pl.List) and dtype.inner in (pl.Float32, pl.Float64):
        element = pl.element()
        return col.list.eval(pl.when(element.is_finite()).then(element).otherwise(None))
    return None


def json_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame without hidden columns, every value JSON-representable."""
    frame = strip_hidden(frame)
    changes = [
        expr.alias(name)
        for name, dtype in frame.schema.items()
        if (expr := _json_value(name, dtype)) is not None
    ]
    return frame.with_columns(changes) if changes else frame


def _csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    frame = json_ready(frame)
    changes = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.Struct):
            text = pl.col(name).struct.json_encode()
            changes.append(pl.when(pl.col(name).is_null()).then(None).otherwise(text).alias(name))
        elif isinstance(dtype, pl.List | pl.Array):
            # {"v":[…]} without its first five and last characters is the list's JSON text.
            text = pl.struct(pl.col(name).alias("v")).struct.json_encode()
            changes.append(
                pl.when(pl.col(name).is_null())
                .then(None)
                .otherwise(text.str.slice(5, text.str.len_bytes() - 6))
                .alias(name)
            )
    return frame.with_columns(changes) if changes else frame


def to_records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts (for inline results)."""
    return json_ready(frame).to_dicts()


class RowWriter:
    """Writes frames one after another as one JSON Lines, CSV or JSON-array document.

    Only one frame is held at a time; ``close()`` finishes the document (the closing ``]`` of
    JSON, the header of a CSV that got no rows) and leaves the file open.
    """

    def __init__(self, stream: IO[bytes], fmt: OutputFormat = "jsonl") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}")
        self._stream = stream
        self._fmt = fmt
        self._started = False
        self._closed = False
        self._columns: list[str] | None = None
        self.rows = 0

    def write(self, frame: pl.DataFrame) -> None:
        if self._closed:
            raise ValueError("the writer is closed")
        if self._columns is None:
            self._columns = strip_hidden(frame).columns
        self.rows += frame.height
        if self._fmt == "csv":
            if frame.height or not self._started:
                if frame.width:
                    _csv_ready(frame).write_csv(self._stream, include_header=not self._started)
                self._started = bool(frame.width)
            return
        if not frame.height:
            return
        buffer = io.BytesIO()
        json_ready(frame).write_ndjson(buffer)
        data = buffer.getvalue()
        if self._fmt == "json":
            data = (b"," if self._started else b"[") + data.rstrip(b"\n").replace(b"\n", b",")
        self._stream.write(data)
        self._started = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fmt == "json":
            self._stream.write(b"]" if self._started else b"[]")

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()


def write_rows(frame: pl.DataFrame, stream: IO[bytes], fmt: OutputFormat = "jsonl") -> None:
    """Write one frame as a whole document; ``RowWriter`` writes many frames as one."""
    with RowWriter(stream, fmt) as writer:
        writer.write(frame)
