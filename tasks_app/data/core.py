"""What every part of the engine shares: the error type and the hidden columns.

Frames carry a few internal columns next to the data, all named with the reserved prefix
``__qw_`` so that no field of the input can collide with them (an input field with that prefix
is refused):

* ``__qw_row``: the row's global input index (0-based), for invalid samples; after an
  ``aggregate`` it is the group's index.
* ``__qw_has:<field>``: whether the row's JSON object had the key ``<field>`` at all. Only
  fields missing from some record get one; JSON Schema tells a missing key from an explicit
  null (``required``) and so must the engine. No column means "present in every row".
* ``__qw_kind:<field>``: for a field whose JSON values mix kinds (a ``text`` column), each
  value's JSON kind (``boolean``, ``integer``, ``number``, ``string``, ``object``, ``array``;
  null for null), an Enum whose categories are the kinds seen over the whole input. With the
  text, it gives back the original value (``"1"`` the string, or ``1`` the number), so that
  ``validate`` judges what the input held.
* ``__qw_op``: in frames of rejected rows, the index of the operation that rejected them.

Outputs (``to_records``, ``write_rows``, ``MergeResult.frame``) never show them.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from tasks_app.data.rules import PREFIX
from tasks_app.data.rules import json_path as json_path  # re-exported for the engine

ROW = "__qw_row"
OP = "__qw_op"
_HAS = "__qw_has:"
_KIND = "__qw_kind:"


class DataError(Exception):
    """Bad data or a pipeline that cannot apply to it: a permanent failure of the task.

    The message names the operation at fault as ``operations[i]…`` where there is one.
    """


def has_column(field: str) -> str:
    """The name of the presence column of ``field``."""
    return _HAS + field


def kind_column(field: str) -> str:
    """The name of the JSON-kind column of a mixed-kind ``field``."""
    return _KIND + field


def companions(frame: pl.DataFrame, field: str) -> list[str]:
    """The hidden columns that belong to ``field`` in ``frame`` (presence, JSON kind)."""
    return [name for name in (has_column(field), kind_column(field)) if name in frame.columns]


def is_hidden(name: str) -> bool:
    return name.startswith(PREFIX)


def visible(frame: pl.DataFrame) -> list[str]:
    return [name for name in frame.columns if not is_hidden(name)]


def strip_hidden(frame: pl.DataFrame) -> pl.DataFrame:
    hidden = [name for name in frame.columns if is_hidden(name)]
    return frame.drop(hidden) if hidden else frame


def present(frame: pl.DataFrame, field: str) -> pl.Expr:
    """Whether each row has the key ``field`` (a missing column: no row has it)."""
    if field not in frame.columns:
        return pl.lit(False)
    if has_column(field) in frame.columns:
        return pl.col(has_column(field))
    return pl.lit(True)


def column(frame: pl.DataFrame, field: str) -> pl.Expr:
    """The field's values; a field that no row has reads as a column of nulls."""
    return pl.col(field) if field in frame.columns else pl.lit(None).alias(field)


def check_field_names(names: Any, where: str = "input") -> None:
    for name in names:
        if isinstance(name, str) and name.startswith(PREFIX):
            raise DataError(f"{where}: field names starting with {PREFIX!r} are reserved: {name!r}")


def op_path(index: int) -> str:
    return f"operations[{index}]"


def kind(dtype: pl.DataType) -> str:
    """The engine's coarse kind of a column type, for the type rules of the operations."""
    if dtype == pl.String:
        return "text"
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_numeric():
        return "number"
    if dtype == pl.Date:
        return "date"
    if isinstance(dtype, pl.Datetime):
        return "datetime"
    if dtype == pl.Null:
        return "null"
    if isinstance(dtype, pl.List | pl.Array):
        return "list"
    if isinstance(dtype, pl.Struct):
        return "object"
    return str(dtype)


KIND_NAMES = {
    "text": "text",
    "bool": "a boolean",
    "number": "a number",
    "date": "a date",
    "datetime": "a datetime",
    "null": "null",
    "list": "a list",
    "object": "an object",
}
