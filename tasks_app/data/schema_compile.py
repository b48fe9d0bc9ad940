"""Compiling JSON Schema keywords into Polars expressions (see ``schema_check``).

``Compiler.row(schema)`` gives a boolean expression over a frame's rows; a subschema it cannot
compile becomes a ``Residual``: a hidden boolean column that ``schema_check`` fills row by row
(or value by value) before the expression is evaluated. Every expression is free of nulls.

A column that mixes JSON kinds (text with a kind column, see ``core``) compiles once per kind
it may hold: its integers are read as Int64, its numbers as Float64, its booleans as
Booleans, and the expression picks, row by row, the branch of the value's kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from tasks_app.data.core import PREFIX, kind_column, present, visible

TRUE = pl.lit(True)
FALSE = pl.lit(False)
REFERENCES = {"$ref", "$dynamicRef", "$defs", "definitions", "$id", "$anchor", "$dynamicAnchor"}
_OBJECT = {
    "properties",
    "required",
    "additionalProperties",
    "patternProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedProperties",
}
_ARRAY = {
    "items",
    "prefixItems",
    "contains",
    "minItems",
    "maxItems",
    "uniqueItems",
    "unevaluatedItems",
}
_NUMBER = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_STRING = {"minLength", "maxLength", "pattern"}
_COMPARE = {
    "minimum": lambda v, m: v >= m,
    "maximum": lambda v, m: v <= m,
    "exclusiveMinimum": lambda v, m: v > m,
    "exclusiveMaximum": lambda v, m: v < m,
}
# Escapes that Polars' regex and jsonschema-rs read alike: metacharacters, newline, return, tab.
_PLAIN_ESCAPES = set(".^$|?*+()[]{}\\/-nrt")
# ECMA-262's ``\d`` and ``\w``, as jsonschema-rs reads them: ASCII only.
_ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_"}


class Unsupported(Exception):
    pass


def json_kind(dtype: pl.DataType) -> str:
    """The JSON type that a column's values have (``number`` may also be integral)."""
    if dtype == pl.String or dtype == pl.Date or isinstance(dtype, pl.Datetime):
        return "string"
    if dtype == pl.Boolean:
        return "boolean"
    if dtype.is_integer():
        return "integer"
    if dtype.is_numeric():
        return "number"
    if dtype == pl.Null:
        return "null"
    if isinstance(dtype, pl.List | pl.Array):
        return "array"
    if isinstance(dtype, pl.Struct):
        return "object"
    raise Unsupported


def mentions(schema: Any, keys: set[str]) -> bool:
    if isinstance(schema, dict):
        return bool(keys & schema.keys()) or any(mentions(v, keys) for v in schema.values())
    if isinstance(schema, list):
        return any(mentions(v, keys) for v in schema)
    return False


def _all(exprs: list[pl.Expr]) -> pl.Expr:
    return pl.all_horizontal(exprs) if exprs else TRUE


def _any(exprs: list[pl.Expr]) -> pl.Expr:
    return pl.any_horizontal(exprs) if exprs else FALSE


def _literal(value: int | float) -> pl.Expr:
    if isinstance(value, int) and not -(2**62) < value < 2**62:
        return pl.lit(float(value))
    return pl.lit(value)


@dataclass
class Residual:
    column: str
    field: str | None  # None: the whole row
    schema: Any


@dataclass
class Compiler:
    frame: pl.DataFrame
    residuals: list[Residual] = field(default_factory=list)

    def residual(self, field_name: str | None, schema: Any) -> pl.Expr:
        name = f"{PREFIX}check{len(self.residuals)}"
        self.residuals.append(Residual(name, field_name, schema))
        return pl.col(name)

    def row(self, schema: Any) -> pl.Expr:
        try:
            return self._row(schema)
        except Unsupported:
            return self.residual(None, schema)

    def _row(self, schema: Any) -> pl.Expr:
        if isinstance(schema, bool):
            return TRUE if schema else FALSE
        parts = [self._combinators(schema, self.row)]
        frame = self.frame
        names = visible(frame)
        for key, arg in schema.items():
            if key in ("type", "enum", "const"):
                parts.append(self._row_generic(key, arg))
            elif key == "required":
                parts.append(_all([present(frame, name) for name in arg]))
            elif key == "properties":
                parts.append(
                    _all(
                        [
                            ~present(frame, name) | self.value(sub, name)
                            for name, sub in arg.items()
                            if name in frame.columns
                        ]
                    )
                )
            elif key == "additionalProperties":
                if "patternProperties" in schema:
                    raise Unsupported
                extra = [n for n in names if n not in schema.get("properties", {})]
                parts.append(_all([~present(frame, n) | self.value(arg, n) for n in extra]))
            elif key in ("minProperties", "maxProperties"):
                flags = [present(frame, n).cast(pl.Int64) for n in names]
                count = pl.sum_horizontal(flags) if flags else pl.lit(0)
                parts.append(count >= arg if key == "minProperties" else count <= arg)
            elif key == "dependentRequired":
                parts.append(
                    _all(
                        [
                            ~present(frame, name)
                            | _all([present(frame, other) for other in needed])
                            for name, needed in arg.items()
                        ]
                    )
                )
            elif key in _OBJECT:
                raise Unsupported
        return _all(parts)

    def _row_generic(self, key: str, arg: Any) -> pl.Expr:
        if key == "type":
            return TRUE if "object" in ([arg] if isinstance(arg, str) else arg) else FALSE
        members = arg if key == "enum" else [arg]
        if any(isinstance(m, dict) for m in members):
            raise Unsupported
        return FALSE

    def _combinators(self, schema: dict[str, Any], sub: Any) -> pl.Expr:
        parts: list[pl.Expr] = []
        if "allOf" in schema:
            parts.append(_all([sub(s) for s in schema["allOf"]]))
        if "anyOf" in schema:
            parts.append(_any([sub(s) for s in schema["anyOf"]]))
        if "oneOf" in schema:
            hits = [sub(s).cast(pl.Int32) for s in schema["oneOf"]]
            parts.append(pl.sum_horizontal(hits) == 1)
        if "not" in schema:
            parts.append(~sub(schema["not"]))
        if "if" in schema:
            test = sub(schema["if"])
            then = sub(schema["then"]) if "then" in schema else TRUE
            otherwise = sub(schema["else"]) if "else" in schema else TRUE
            parts.append((test & then) | (~test & otherwise))
        return _all(parts)

    def value(self, schema: Any, name: str) -> pl.Expr:
        """Whether the value of ``name`` (a present key) is valid under ``schema``."""
        try:
            return self._value(schema, name)
        except Unsupported:
            return self.residual(name, schema)

    def _value(self, schema: Any, name: str) -> pl.Expr:
        dtype = self.frame.schema[name]
        kinds = kind_column(name)
        if kinds not in self.frame.columns:
            temporal = dtype == pl.Date or isinstance(dtype, pl.Datetime)
            return self._view(schema, name, _View(pl.col(name), json_kind(dtype), temporal))
        # One branch per kind the column may hold (its categories); null has its own.
        which = pl.col(kinds)
        expr = self._view(schema, name, _View(pl.col(name), "null"))
        for kind in self.frame.schema[kinds].categories.to_list():  # type: ignore[attr-defined]
            branch = self._view(schema, name, _mixed_view(name, kind))
            expr = pl.when(which == kind).then(branch).otherwise(expr)
        return expr

    def _view_or_residual(self, schema: Any, name: str, view: _View) -> pl.Expr:
        try:
            return self._view(schema, name, view)
        except Unsupported:
            return self.residual(name, schema)

    def _view(self, schema: Any, name: str, view: _View) -> pl.Expr:
        if isinstance(schema, bool):
            return TRUE if schema else FALSE
        kind, v, temporal = view.kind, view.values, view.temporal
        if kind == "number":
            v = pl.when(v.is_finite()).then(v).otherwise(None)
        parts = [self._combinators(schema, lambda s: self._view_or_residual(s, name, view))]
        for key, arg in schema.items():
            if key == "type":
                types = [arg] if isinstance(arg, str) else arg
                parts.append(_any([_is_type(t, kind, v) for t in types]))
            elif key in ("enum", "const"):
                parts.append(_in(arg if key == "enum" else [arg], kind, v, temporal))
            elif key in _COMPARE and kind in ("integer", "number"):
                parts.append(_COMPARE[key](v, _literal(arg)).fill_null(True))
            elif key == "multipleOf" and kind in ("integer", "number"):
                if kind == "number" or isinstance(arg, float):
                    raise Unsupported
                parts.append((v % arg == 0).fill_null(True))
            elif key in _STRING and kind == "string":
                if temporal:
                    raise Unsupported
                parts.append(_string_check(key, arg, v))
            elif (key in _OBJECT and kind == "object") or (key in _ARRAY and kind == "array"):
                raise Unsupported
            elif key in ("$ref", "$dynamicRef"):
                raise Unsupported
        return _all(parts)


@dataclass(frozen=True)
class _View:
    """A column's values seen as one JSON kind (for a mixed column: the rows of that kind)."""

    values: pl.Expr
    kind: str
    temporal: bool = False


def _mixed_view(name: str, kind: str) -> _View:
    text = pl.col(name)
    if kind == "integer":
        return _View(text.cast(pl.Int64, strict=False), kind)
    if kind == "number":
        return _View(text.cast(pl.Float64, strict=False), kind)
    if kind == "boolean":
        return _View(text == "true", kind)
    # Strings are the text; objects and arrays are only ever tested for being there.
    return _View(text, kind)


def _is_type(name: str, kind: str, v: pl.Expr) -> pl.Expr:
    if name == "null":
        return v.is_null()
    if name == kind or (name == "number" and kind == "integer"):
        return v.is_not_null()
    if name == "integer" and kind == "number":
        return (v == v.floor()).fill_null(False)
    return FALSE


def _in(members: list[Any], kind: str, v: pl.Expr, temporal: bool) -> pl.Expr:
    hit_null = v.is_null() if any(m is None for m in members) else FALSE
    if kind == "string":
        if temporal:
            raise Unsupported
        values: list[Any] = [m for m in members if isinstance(m, str)]
    elif kind == "boolean":
        values = [m for m in members if isinstance(m, bool)]
    elif kind in ("integer", "number"):
        numbers = [m for m in members if isinstance(m, int | float) and not isinstance(m, bool)]
        if kind == "integer":
            values = [int(m) for m in numbers if float(m).is_integer() and abs(m) < 2**62]
        else:
            values = [float(m) for m in numbers]
    elif kind in ("array", "object"):
        if any(isinstance(m, list | dict) for m in members):
            raise Unsupported
        values = []
    else:
        values = []
    if not values:
        return hit_null
    return v.is_in(values).fill_null(False) | hit_null


def _string_check(key: str, arg: Any, v: pl.Expr) -> pl.Expr:
    if key == "minLength":
        return (v.str.len_chars() >= arg).fill_null(True)
    if key == "maxLength":
        return (v.str.len_chars() <= arg).fill_null(True)
    pattern = polars_pattern(arg)
    if pattern is None:
        raise Unsupported
    try:
        pl.select(pl.lit("").str.contains(pattern))
    except pl.exceptions.PolarsError as exc:
        raise Unsupported from exc
    return v.str.contains(pattern).fill_null(True)


def polars_pattern(pattern: str) -> str | None:
    """``pattern`` as Polars must read it to match as jsonschema-rs does; None: not sure.

    jsonschema-rs reads ``\\d`` and ``\\w`` as ECMA-262 does (ASCII only), Rust's own regex as
    Unicode classes, so they are spelled out. Left to the row-wise check: other escapes than
    ``_PLAIN_ESCAPES``, groups with ``(?`` other than ``(?:``, ``{,``, and in a character
    class a ``[``, a set operation (``&&``, ``--``, ``~~``), ``\\D`` or ``\\W``, a class
    escape next to a ``-``, or a leading ``]`` (``[]`` is empty in ECMA-262, a ``]`` in Rust).
    """
    if "{," in pattern or re.search(r"\(\?(?!:)", pattern):
        return None
    out: list[str] = []
    in_class = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            escaped = pattern[index + 1 : index + 2]
            if escaped.lower() in _ASCII_CLASSES:
                members = _ASCII_CLASSES[escaped.lower()]
                if not in_class:
                    out.append(f"[^{members}]" if escaped.isupper() else f"[{members}]")
                elif escaped.isupper() or "-" in (out[-1], pattern[index + 2 : index + 3]):
                    return None
                else:
                    out.append(members)
            elif escaped and escaped in _PLAIN_ESCAPES:
                out.append(char + escaped)
            else:
                return None
            index += 2
            continue
        if in_class:
            if char == "[" or pattern[index : index + 2] in ("&&", "--", "~~"):
                return None
            in_class = char != "]"
        elif char == "[":
            start = index + (2 if pattern[index + 1 : index + 2] == "^" else 1)
            if pattern[start : start + 1] == "]":
                return None
            out.append(pattern[index:start])
            in_class = True
            index = start
            continue
        out.append(char)
        index += 1
    return "".join(out)
