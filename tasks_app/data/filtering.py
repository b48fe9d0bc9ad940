"""``filter``: keep the rows where a condition holds.

Nulls (and missing keys) never compare: ``eq``, ``ne``, ``lt``…, ``in`` and ``contains`` are
false for a null value, so ``{"field": "x", "ne": 1}`` drops rows where ``x`` is null too (as
in SQL); only ``is_null`` sees them. A field that no row has is null everywhere.

Types are not guessed: a number compares with a number column, a string with a text column
(code point order for ``lt``…) or with a date/datetime column (the string is read as ISO
8601), a boolean with a boolean column (``eq``/``ne``/``in`` only). Comparing a text column
with a number is an error that says to ``cast`` first: comparing ``"10" < "9"`` as text
would silently give the wrong rows. ``contains`` is a substring test on text and an element
test on lists. ``{"all": []}`` holds, ``{"any": []}`` does not.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl

from tasks_app.data.core import KIND_NAMES, DataError, kind, op_path
from tasks_app.data.rowwise import Step

COMPARISONS = ("eq", "ne", "lt", "lte", "gt", "gte")
OPERATORS = (*COMPARISONS, "in", "contains", "is_null")


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    return type(value).__name__


def _temporal(value: str, column_kind: str, path: str) -> Any:
    try:
        if column_kind == "date":
            return dt.date.fromisoformat(value)
        moment = dt.datetime.fromisoformat(value)
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    except ValueError as exc:
        raise DataError(f"{path}: {value!r} is not an ISO 8601 {column_kind}") from exc


class _Conditions:
    def __init__(self, frame: pl.DataFrame, index: int) -> None:
        self.frame = frame
        self.path = f"{op_path(index)}.where"

    def build(self, node: dict[str, Any], path: str) -> pl.Expr:
        if "all" in node:
            parts = [self.build(n, f"{path}.all[{i}]") for i, n in enumerate(node["all"])]
            return pl.all_horizontal(parts) if parts else pl.lit(True)
        if "any" in node:
            parts = [self.build(n, f"{path}.any[{i}]") for i, n in enumerate(node["any"])]
            return pl.any_horizontal(parts) if parts else pl.lit(False)
        name = node["field"]
        operator = next(key for key in OPERATORS if key in node)
        value = node[operator]
        if name not in self.frame.columns or self.frame.schema[name] == pl.Null:
            return pl.lit(bool(value) if operator == "is_null" else False)
        col = pl.col(name)
        if operator == "is_null":
            return col.is_null() if value else col.is_not_null()
        dtype = self.frame.schema[name]
        column_kind = kind(dtype)
        where = f"{path}.{operator}"
        if operator == "contains":
            return self._contains(col, dtype, column_kind, value, where, name)
        values = value if operator == "in" else [value]
        values = [self._operand(v, column_kind, operator, where, name) for v in values]
        if operator == "in":
            if column_kind == "number" and (
                dtype.is_float() or any(isinstance(v, float) for v in values)
            ):
                return col.cast(pl.Float64).is_in([float(v) for v in values]).fill_null(False)
            return col.is_in(pl.Series(values, dtype=dtype, strict=False).implode()).fill_null(
                False
            )
        expr = {
            "eq": col == values[0],
            "ne": col != values[0],
            "lt": col < values[0],
            "lte": col <= values[0],
            "gt": col > values[0],
            "gte": col >= values[0],
        }[operator]
        return expr.fill_null(False)

    def _operand(self, value: Any, column_kind: str, operator: str, where: str, name: str) -> Any:
        given = _value_kind(value)
        ordered = operator in ("lt", "lte", "gt", "gte")
        if column_kind == "text" and given == "number":
            raise DataError(
                f"{where}: field {name!r} holds text and {value!r} is a number; "
                f'cast the field first (an operation {{"op": "cast", "fields": '
                f'{{"{name}": "int"}}}} or "float" before this filter)'
            )
        if column_kind in ("date", "datetime") and given == "text":
            return _temporal(value, column_kind, where)
        if column_kind == "bool" and given == "bool" and not ordered:
            return value
        if column_kind == given and column_kind in ("text", "number"):
            return value
        found = KIND_NAMES.get(column_kind, column_kind)
        raise DataError(
            f"{where}: field {name!r} is {found}; it cannot be compared with {value!r}"
            + (" by order" if column_kind == "bool" and given == "bool" else "")
        )

    def _contains(
        self, col: pl.Expr, dtype: pl.DataType, column_kind: str, value: Any, where: str, name: str
    ) -> pl.Expr:
        if column_kind == "text":
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} holds text; contains takes a string")
            return col.str.contains(value, literal=True).fill_null(False)
        if column_kind == "list":
            inner = kind(dtype.inner)  # type: ignore[attr-defined]
            if inner not in ("null", _value_kind(value)):
                found = KIND_NAMES.get(inner, inner)
                raise DataError(f"{where}: field {name!r} is a list of {found} values")
            if inner == "null":
                return pl.lit(False)
            return col.list.contains(value).fill_null(False)
        found = KIND_NAMES.get(column_kind, column_kind)
        raise DataError(f"{where}: field {name!r} is {found}; contains applies to text and lists")


def filter_rows(frame: pl.DataFrame, op: dict[str, Any], index: int) -> Step:
    conditions = _Conditions(frame, index)
    mask = conditions.build(op["where"], conditions.path)
    kept = frame.filter(mask)
    return Step(kept, {"rows_in": frame.height, "rows_out": kept.height})
