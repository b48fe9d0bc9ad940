"""Column types of JSON records, decided over the whole input and shared by every batch.

A batch must not decide its own types: ``[1, 2]`` in one batch and ``[1.5]`` in the next would
make an Int64 and a Float64 column that the merge cannot treat as one, and a filter would then
behave differently depending on where a row landed. So the plumbing streams the source once
through a ``SchemaBuilder`` (builders of parts of the input merge), sends ``schema.to_json()``
to every batch, and each batch builds its frame with ``frame_from_records(rows, schema)``.

A field's type, from the JSON kinds of its non-null values:

==========================  ===========================================================
ints only                   ``int`` (Int64)
ints and floats, or ints    ``float`` (Float64)
beyond 64 bits
bools only                  ``bool`` (Boolean)
strings only                ``str`` (String)
objects only                ``{"struct": [[name, type], …]}`` (Struct, types per key)
arrays only                 ``{"list": type}`` (List of the items' type)
only nulls, or no value     ``null`` (Polars' Null type)
anything else (mixed)       ``text`` (String: a string as it is, other values as their
                            compact JSON text, e.g. ``1``, ``true``, ``{"a":1}``)
==========================  ===========================================================

An empty object becomes ``text`` (``{}``) rather than a Struct without fields. Inside a
nested object a missing key reads as null; at the top level the engine remembers which keys
each row had (see ``core``).

A top-level ``text`` field also records the JSON kinds it holds (``kinds``), and its frame has
a hidden kind column saying which kind each value was (see ``core``): ``"1"`` and ``1`` read
the same as text but stay a string and a number for ``validate``, which can then give such a
column one type (see ``schema_check``). Inside lists and objects a ``text`` value is only text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from tasks_app.data.core import DataError, check_field_names, has_column, kind_column

Type = Any  # "null" | "bool" | "int" | "float" | "str" | "text" | {"list": T} | {"struct": [..]}
_INT64 = (-(2**63), 2**63 - 1)
_SCALARS = {"null", "bool", "int", "float", "str", "text"}
# The JSON Schema name of each kind of value; a "float" is also an int beyond 64 bits.
JSON_KINDS = {
    "bool": "boolean",
    "int": "integer",
    "float": "number",
    "str": "string",
    "object": "object",
    "array": "array",
}


def _value_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value <= _INT64[1] else "float"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    raise DataError(f"not a JSON value: {value!r}")


@dataclass
class _Acc:
    """What has been seen of one field (or one nested key, or the items of arrays)."""

    kinds: set[str] = field(default_factory=set)
    keys: dict[str, _Acc] = field(default_factory=dict)
    items: _Acc | None = None
    present: int = 0

    def add(self, value: Any) -> None:
        self.present += 1
        kind = _value_kind(value)
        self.kinds.add(kind)
        if kind == "object":
            for key, item in value.items():
                self.keys.setdefault(key, _Acc()).add(item)
        elif kind == "array":
            if self.items is None:
                self.items = _Acc()
            for item in value:
                self.items.add(item)

    def merge(self, other: _Acc) -> None:
        self.present += other.present
        self.kinds |= other.kinds
        for key, acc in other.keys.items():
            self.keys.setdefault(key, _Acc()).merge(acc)
        if other.items is not None:
            if self.items is None:
                self.items = _Acc()
            self.items.merge(other.items)

    def json_kinds(self) -> tuple[str, ...]:
        """The JSON kinds seen, in a fixed order (the categories of a kind column)."""
        return tuple(name for kind, name in JSON_KINDS.items() if kind in self.kinds)

    def type(self) -> Type:
        kinds = self.kinds - {"null"}
        if not kinds:
            return "null"
        if len(kinds) == 1 and next(iter(kinds)) in _SCALARS:
            return next(iter(kinds))
        if kinds == {"int", "float"}:
            return "float"
        if kinds == {"object"} and self.keys:
            return {"struct": [[key, acc.type()] for key, acc in self.keys.items()]}
        if kinds == {"array"}:
            return {"list": self.items.type() if self.items is not None else "null"}
        return "text"


class SchemaBuilder:
    """Streams records once and decides every field's type; ``merge`` joins builders of parts.

    Merge builders in input order: fields keep the order of their first appearance.
    """

    def __init__(self) -> None:
        self._fields: dict[str, _Acc] = {}
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        if not isinstance(row, dict):
            raise DataError(f"row {self.rows} is not a JSON object")
        self.rows += 1
        fields = self._fields
        for key, value in row.items():
            acc = fields.get(key)
            if acc is None:
                check_field_names([key])
                acc = fields[key] = _Acc()
            acc.add(value)

    def merge(self, other: SchemaBuilder) -> SchemaBuilder:
        for key, acc in other._fields.items():
            self._fields.setdefault(key, _Acc()).merge(acc)
        self.rows += other.rows
        return self

    def schema(self) -> Schema:
        fields = []
        for name, acc in self._fields.items():
            type_ = acc.type()
            kinds = acc.json_kinds() if type_ == "text" else ()
            fields.append(SchemaField(name, type_, acc.present < self.rows, kinds))
        return Schema(tuple(fields))


@dataclass(frozen=True)
class SchemaField:
    name: str
    type: Type
    # Missing from some record: the frame gets a presence column for it.
    optional: bool = False
    # A ``text`` field's JSON kinds: the frame gets a kind column for it.
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    fields: tuple[SchemaField, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form (a dict) for task arguments; ``from_json`` reads it back."""
        fields = []
        for f in self.fields:
            data = {"name": f.name, "type": f.type, "optional": f.optional}
            if f.kinds:
                data["kinds"] = list(f.kinds)
            fields.append(data)
        return {"version": 1, "fields": fields}

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Schema:
        """Read ``to_json()``'s dict, or that dict as a JSON string."""
        if isinstance(data, str):
            data = json.loads(data)
        assert isinstance(data, dict)
        return cls(
            tuple(
                SchemaField(
                    f["name"],
                    _check_type(f["type"]),
                    bool(f.get("optional", False)),
                    _check_kinds(f.get("kinds", [])),
                )
                for f in data["fields"]
            )
        )

    def polars_schema(self) -> dict[str, pl.DataType]:
        return {f.name: polars_type(f.type) for f in self.fields}


def infer_schema(rows: Iterable[dict[str, Any]]) -> Schema:
    builder = SchemaBuilder()
    for row in rows:
        builder.add(row)
    return builder.schema()


def _check_type(type_: Type) -> Type:
    polars_type(type_)
    return type_


def _check_kinds(kinds: list[str]) -> tuple[str, ...]:
    known = tuple(JSON_KINDS.values())
    if not set(kinds) <= set(known):
        raise ValueError(f"not JSON kinds: {kinds!r}")
    return tuple(name for name in known if name in kinds)


def polars_type(type_: Type) -> pl.DataType:
    if isinstance(type_, str):
        simple: dict[str, pl.DataType] = {
            "null": pl.Null(),
            "bool": pl.Boolean(),
            "int": pl.Int64(),
            "float": pl.Float64(),
            "str": pl.String(),
            "text": pl.String(),
        }
        if type_ in simple:
            return simple[type_]
    elif isinstance(type_, dict) and set(type_) == {"list"}:
        return pl.List(polars_type(type_["list"]))
    elif isinstance(type_, dict) and set(type_) == {"struct"}:
        return pl.Struct({name: polars_type(inner) for name, inner in type_["struct"]})
    raise ValueError(f"not a schema type: {type_!r}")


def _json_kind(value: Any) -> str | None:
    return None if value is None else JSON_KINDS[_value_kind(value)]


def _text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _converter(type_: Type) -> Callable[[Any], Any] | None:
    """How to turn a JSON value into the column's Python value; None when it already is one."""
    if type_ == "text":
        return _text
    if type_ == "float":
        return lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if isinstance(type_, dict) and "list" in type_:
        inner = _converter(type_["list"])
        if inner is None:
            return None
        return lambda v: None if v is None else [inner(item) for item in v]
    if isinstance(type_, dict) and "struct" in type_:
        parts = [(name, _converter(inner)) for name, inner in type_["struct"]]
        if all(conv is None for _, conv in parts):
            return None
        return lambda v: (
            None if v is None else {n: (c(v.get(n)) if c else v.get(n)) for n, c in parts}
        )
    return None


def frame_from_records(rows: list[dict[str, Any]], schema: Schema | None = None) -> pl.DataFrame:
    """Build a frame of JSON records with ``schema`` (None: inferred from these rows).

    A key of a record that the schema does not know is an error: the schema has to come from
    the same input.
    """
    if schema is None:
        schema = infer_schema(rows)
    known = {f.name for f in schema.fields}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"row {index} is not a JSON object")
        if not row.keys() <= known:
            extra = sorted(set(row) - known)
            raise DataError(f"row {index}: field {extra[0]!r} is not in the schema")
    columns: list[pl.Series] = []
    for f in schema.fields:
        values = [row.get(f.name) for row in rows]
        convert = _converter(f.type)
        if convert is not None:
            values = [convert(v) for v in values]
        try:
            columns.append(pl.Series(f.name, values, dtype=polars_type(f.type), strict=True))
        except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError) as exc:
            raise DataError(f"field {f.name!r} does not fit its type {f.type!r}: {exc}") from exc
    for f in schema.fields:
        if f.optional:
            flags = [f.name in row for row in rows]
            columns.append(pl.Series(has_column(f.name), flags, dtype=pl.Boolean))
        if f.kinds:
            kinds = [_json_kind(row.get(f.name)) for row in rows]
            try:
                columns.append(pl.Series(kind_column(f.name), kinds, dtype=pl.Enum(f.kinds)))
            except pl.exceptions.PolarsError as exc:
                raise DataError(f"field {f.name!r} holds other kinds than {f.kinds!r}") from exc
    return pl.DataFrame(columns, height=len(rows)) if columns else pl.DataFrame(height=len(rows))
