"""``cast``: change fields' types; a value that does not convert makes its row invalid.

From text (surrounding white space is ignored, as CSV fields often carry it):

* ``int``: optional sign and ASCII digits (``"+42"``, ``" 042 "``); ``"1.5"`` or ``"1e3"``
  are invalid, and so is a value beyond 64 bits.
* ``float``: a decimal or exponent number (``"1.5"``, ``"-.5"``, ``"1e3"``); ``nan`` and
  ``inf`` are invalid (results are strict JSON).
* ``bool``: ``true``/``false``, ``1``/``0``, ``yes``/``no``, in any case.
* ``date``: ``YYYY-MM-DD``, an existing day.
* ``datetime``: ISO 8601 ``YYYY-MM-DD[(T| )HH:MM[:SS[.fraction]]][Z|±HH:MM|±HHMM]``; a time
  with an offset is converted to UTC, one without is taken as UTC (the column is UTC).

From numbers: ``int`` only from a whole value (``1.0`` → 1, ``1.5`` is invalid, no silent
truncation); ``bool`` only from 0 and 1. A boolean casts to 0/1 and ``"true"``/``"false"``. A
date casts to a datetime at midnight UTC and a datetime to its UTC date. ``str`` gives a
value's text (objects and lists: their JSON). Null stays null; a field no row has is left
alone. Empty (or blank) text casts to null for every type but ``str``: in CSV it is how a
missing value is written. Anything else (a number to a date, say) is invalid.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from tasks_app.data.core import kind, kind_column
from tasks_app.data.rowwise import Step, reject
from tasks_app.data.writers import datetime_text

TYPES = ("int", "float", "bool", "str", "date", "datetime")
UTC = pl.Datetime("us", "UTC")
_TARGET: dict[str, pl.DataType] = {
    "int": pl.Int64(),
    "float": pl.Float64(),
    "bool": pl.Boolean(),
    "str": pl.String(),
    "date": pl.Date(),
    "datetime": UTC,
}
_INT = r"^[+-]?[0-9]+$"
_FLOAT = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"
_DATETIME = (
    r"^([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ]([0-9]{2}:[0-9]{2})(:[0-9]{2}(?:\.[0-9]{1,9})?)?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})?)?$"
)
_TRUE = ["true", "1", "yes"]
_FALSE = ["false", "0", "no"]


def _from_text(v: pl.Expr, target: str) -> pl.Expr:
    s = v.str.strip_chars()
    if target == "int":
        return pl.when(s.str.contains(_INT)).then(s.cast(pl.Int64, strict=False))
    if target == "float":
        number = s.cast(pl.Float64, strict=False)
        return pl.when(s.str.contains(_FLOAT) & number.is_finite()).then(number)
    if target == "bool":
        low = s.str.to_lowercase()
        return pl.when(low.is_in(_TRUE)).then(True).when(low.is_in(_FALSE)).then(False)
    if target == "date":
        return pl.when(s.str.contains(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")).then(
            s.str.strptime(pl.Date, "%Y-%m-%d", strict=False)
        )
    if target == "datetime":
        parts = s.str.extract_groups(_DATETIME)
        date, hm, seconds, offset = (parts.struct.field(str(i)) for i in range(1, 5))
        offset = offset.str.replace("Z", "+00:00").str.replace(r"^([+-]\d\d)(\d\d)$", "$1:$2")
        text = pl.concat_str(
            [
                date,
                pl.lit("T"),
                hm.fill_null("00:00"),
                seconds.fill_null(":00"),
                offset.fill_null("+00:00"),
            ]
        )
        return text.str.strptime(UTC, "%Y-%m-%dT%H:%M:%S%.f%:z", strict=False)
    return v


def _to_json_text(series: pl.Series) -> pl.Series:
    texts = [
        None if v is None else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
        for v in series.to_list()
    ]
    return pl.Series(series.name, texts, dtype=pl.String)


def _converted(frame: pl.DataFrame, name: str, target: str) -> pl.Expr | pl.Series:
    dtype = frame.schema[name]
    source = kind(dtype)
    v = pl.col(name)
    none = pl.lit(None, dtype=_TARGET[target])
    if source == "null":
        return v.cast(_TARGET[target])
    if source == "text":
        return _from_text(v, target)
    if target == "str":
        if source in ("object", "list"):
            return _to_json_text(frame.get_column(name))
        if source == "date":
            return v.dt.strftime("%Y-%m-%d")
        if isinstance(dtype, pl.Datetime):
            return datetime_text(v, dtype)
        return v.cast(pl.String)
    if source == "number":
        if target == "int":
            if not dtype.is_float():
                return v.cast(pl.Int64, strict=False)
            whole = v.is_finite() & (v == v.floor()) & (v.abs() < 2**63)
            return pl.when(whole).then(v.cast(pl.Int64, strict=False))
        if target == "float":
            return v.cast(pl.Float64)
        if target == "bool":
            return pl.when(v == 1).then(True).when(v == 0).then(False)
        return none
    if source == "bool":
        return v.cast(_TARGET[target]) if target in ("int", "float", "bool") else none
    if source == "date":
        if target == "date":
            return v
        return (
            v.cast(pl.Datetime("us")).dt.replace_time_zone("UTC") if target == "datetime" else none
        )
    if isinstance(dtype, pl.Datetime):
        utc = v.dt.convert_time_zone("UTC") if dtype.time_zone else v.dt.replace_time_zone("UTC")
        if target == "datetime":
            return utc.cast(UTC)
        return utc.dt.date() if target == "date" else none
    return none


def _failed(frame: pl.DataFrame, name: str, result: str, target: str) -> pl.Expr:
    """A value was there and did not convert (empty text to a non-text type is null)."""
    failed = pl.col(name).is_not_null() & pl.col(result).is_null()
    if frame.schema[name] == pl.String and target != "str":
        failed = failed & (pl.col(name).str.strip_chars() != "")
    return failed


def cast(frame: pl.DataFrame, op: dict[str, Any], index: int) -> Step:
    fields = {name: target for name, target in op["fields"].items() if name in frame.columns}
    rows_in = frame.height
    if not fields:
        return Step(frame, {"rows_in": rows_in, "rows_out": rows_in, "invalid": 0})
    new = {name: _converted(frame, name, target) for name, target in fields.items()}
    out = {name: f"__qw_cast:{name}" for name in fields}
    work = frame.with_columns([expr.alias(out[name]) for name, expr in new.items()])
    failed = [_failed(frame, name, out[name], fields[name]) for name in fields]
    valid = work.select(~pl.any_horizontal(failed)).to_series()

    def why(record: dict[str, Any], row: dict[str, Any]) -> str:
        for name, target in fields.items():
            blank = isinstance(row[name], str) and not row[name].strip() and target != "str"
            if row[name] is not None and row[out[name]] is None and not blank:
                return f"{name}: cannot cast {record.get(name)!r} to {target}"
        return "cannot cast"

    kept, rejected = reject(work, valid, index, op, why)
    kept = kept.with_columns([pl.col(out[name]).alias(name) for name in fields]).drop(out.values())
    # A cast field has one type now: a kind column for its mixed JSON kinds no longer applies.
    kept = kept.drop([kind_column(name) for name in fields if kind_column(name) in kept.columns])
    if rejected.frame is not None:
        rejected.frame = rejected.frame.drop(out.values())
    stats = {"rows_in": rows_in, "rows_out": kept.height, "invalid": rejected.count}
    return Step(kept, stats, [rejected])
