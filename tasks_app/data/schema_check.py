"""JSON Schema (Draft 2020-12) over a frame: one vectorised validity mask per batch.

Each row is the JSON object that the input record was: the values of a column that mixes
JSON kinds as the input held them, and without the keys the record did not have. The common
keywords compile to Polars expressions: ``type`` (names or lists, ``"null"`` included),
``enum``, ``const``, ``required``, ``properties``,
``additionalProperties``, ``minProperties``/``maxProperties``, ``dependentRequired``,
``minimum``/``maximum``/``exclusive*``, ``minLength``/``maxLength`` (code points), ``pattern``,
``multipleOf`` (integers), ``allOf``/``anyOf``/``oneOf``/``not`` and ``if``/``then``/``else``;
keywords for another JSON type than the value's never fail, as in the specification.

What does not compile is checked row by row, as narrowly as possible: a property's subschema
on that column's values (each distinct value once), else the row's whole subschema; a schema
with references (``$ref``, ``$defs``, ``$id``…) is checked whole, row by row. Row-wise checks
use jsonschema-rs. A column of mixed JSON kinds is judged value by value on what the input
held: ``"34"`` the string fails ``{"type": "integer"}`` and ``34`` the number passes, though
both read ``34`` as text.

Regular expressions (``pattern``, ``patternProperties``) run on Rust's ``regex`` engine, in
time linear in the text: jsonschema-rs with its standard engine, or Polars for a compiled
``pattern`` written in syntax that both read alike. Patterns that engine cannot run
(look-around, backreferences) are refused with the payload. ``$`` matches only at the very
end of the text, as in ECMA-262. ``format`` is an annotation, as Draft 2020-12 says by default.

Why a row failed is jsonschema-rs's account (its most relevant error: path and message),
computed only for the rows that are sampled.

After ``validate``, a field that the schema's ``properties`` give one type (``integer``,
``number``, ``string`` or ``boolean``, null allowed or not) has a column of that type in every
batch, decided by the column's type and not by the rows (see ``typed_columns``).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import polars as pl

from tasks_app.data.core import PREFIX, has_column, json_path, kind_column, visible
from tasks_app.data.rules import row_validator
from tasks_app.data.schema_compile import REFERENCES, Compiler, Residual, mentions
from tasks_app.data.writers import json_ready

_WEAK = ("anyOf", "oneOf")
_ALTERNATIVES = (
    jsonschema_rs.ValidationErrorKind.AnyOf,
    jsonschema_rs.ValidationErrorKind.OneOfNotValid,
)


def _decoded(text: str | None, kind: str | None) -> Any:
    if text is None or kind == "string":
        return text
    if kind == "integer":
        return int(text)
    if kind == "number":
        return float(text)  # as in a number column, an integer beyond 64 bits is a float
    if kind == "boolean":
        return text == "true"
    return json.loads(text)


def json_values(frame: pl.DataFrame, name: str) -> list[Any]:
    """The values of ``name`` as the input's JSON had them (a mixed column is decoded)."""
    values = json_ready(frame.select(name)).to_series().to_list()
    if kind_column(name) not in frame.columns:
        return values
    kinds = frame.get_column(kind_column(name)).to_list()
    return [_decoded(text, kind) for text, kind in zip(values, kinds, strict=True)]


def records_for_validation(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Each row as the JSON object that the schema sees: keys the input lacked are left out."""
    records = json_ready(frame).to_dicts()
    for name in visible(frame):
        if kind_column(name) in frame.columns:
            for record, value in zip(records, json_values(frame, name), strict=True):
                record[name] = value
        if has_column(name) in frame.columns:
            flags = frame.get_column(has_column(name)).to_list()
            for record, has in zip(records, flags, strict=True):
                if not has:
                    del record[name]
    return records


def _residual_values(frame: pl.DataFrame, residual: Residual) -> pl.Series:
    validator = row_validator(residual.schema)
    if residual.field is None:
        verdicts = [validator.is_valid(r) for r in records_for_validation(frame)]
    else:
        values = json_values(frame, residual.field)
        cache: dict[Any, bool] = {}
        verdicts = []
        for value in values:
            if isinstance(value, dict | list):
                verdicts.append(validator.is_valid(value))
                continue
            key = (type(value), value)
            if key not in cache:
                cache[key] = validator.is_valid(value)
            verdicts.append(cache[key])
    return pl.Series(residual.column, verdicts, dtype=pl.Boolean)


def valid_mask(frame: pl.DataFrame, schema: Any) -> pl.Series:
    """True for each row valid under ``schema`` (a Draft 2020-12 schema, already checked)."""
    compiler = Compiler(frame)
    if mentions(schema, REFERENCES):
        expr = compiler.residual(None, schema)
    else:
        expr = compiler.row(schema)
    # A column of the frame's length, so that a constant verdict still gives one per row.
    work = frame.with_row_index(f"{PREFIX}index")
    if compiler.residuals:
        work = work.with_columns([_residual_values(frame, r) for r in compiler.residuals])
    anchor = pl.col(f"{PREFIX}index").is_not_null()
    return work.select((anchor & expr.fill_null(False)).alias("valid")).to_series()


def _relevance(error: Any) -> tuple[int, bool]:
    """Shallow errors first, and a keyword of its own before ``anyOf``/``oneOf``."""
    weak = bool(error.schema_path) and error.schema_path[-1] in _WEAK
    return -len(error.instance_path), not weak


def _best(errors: list[Any]) -> Any:
    """The most relevant error, as ``jsonschema.exceptions.best_match`` picks one.

    The shallowest error wins; an ``anyOf``/``oneOf`` that failed is explained by the deepest
    error of its alternatives, unless they tie (then no alternative is the obvious one).
    """
    best = max(errors, key=_relevance)
    while isinstance(best.kind, _ALTERNATIVES):
        context = [error for branch in best.kind.context for error in branch]
        if not context:
            break
        ranked = sorted(context, key=_relevance)
        if len(ranked) > 1 and _relevance(ranked[0]) == _relevance(ranked[1]):
            break
        best = ranked[0]
    return best


def reason(schema: Any, record: dict[str, Any]) -> str:
    """Why ``record`` fails ``schema``: jsonschema-rs's most relevant error."""
    errors = list(row_validator(schema).iter_errors(record))
    if not errors:
        return "does not match the schema"
    error = _best(errors)
    path = json_path(error.instance_path)
    return f"{path}: {error.message}" if path else str(error.message)


_FIXED = ("integer", "number", "string", "boolean")


def fixed_types(schema: Any) -> dict[str, str]:
    """The fields that the schema's ``properties`` give one JSON type, null aside."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    fixed: dict[str, str] = {}
    for name, sub in properties.items():
        if not isinstance(sub, dict) or "type" not in sub:
            continue
        types = {sub["type"]} if isinstance(sub["type"], str) else set(sub["type"])
        types.discard("null")
        if types == {"integer", "number"}:
            types = {"number"}
        if len(types) == 1 and (only := types.pop()) in _FIXED:
            fixed[name] = only
    return fixed


def _fits(dtype: pl.DataType, json_type: str) -> bool:
    if json_type in ("integer", "number"):
        return dtype.is_numeric()
    if json_type == "string":
        return dtype == pl.String or dtype == pl.Date or isinstance(dtype, pl.Datetime)
    return dtype == pl.Boolean


def _typed(frame: pl.DataFrame, name: str, json_type: str) -> pl.Expr | None:
    """The column of ``name`` as ``json_type``; None when it already is one."""
    kinds = kind_column(name)
    if kinds not in frame.columns:
        if _fits(frame.schema[name], json_type):
            return None
        # Every value of another kind made its row invalid: what is left is null.
        target = {"integer": pl.Int64, "number": pl.Float64, "string": pl.String}
        return pl.lit(None, dtype=target.get(json_type, pl.Boolean)).alias(name)
    which, text = pl.col(kinds), pl.col(name)
    if json_type == "string":
        return pl.when(which == "string").then(text).alias(name)
    if json_type == "boolean":
        return pl.when(which == "boolean").then(text == "true").alias(name)
    # Int64 unless the input has non-integral numbers in this field (in any batch).
    floats = "number" in frame.schema[kinds].categories.to_list()  # type: ignore[attr-defined]
    number = which.is_in(["integer", "number"])
    return pl.when(number).then(text.cast(pl.Float64 if floats else pl.Int64)).alias(name)


def typed_columns(frame: pl.DataFrame, schema: Any) -> pl.DataFrame:
    """After ``validate``: give each field of one fixed type a column of that type.

    The rows are valid, so a field's values are all of its type (or null). The new type
    follows from the column's type alone (the same in every batch): a mixed column becomes
    Int64, Float64 (when the input has non-integral numbers there), String or Boolean and
    loses its kind column; a column of another type holds only nulls and is cast. A float
    column stays Float64 under ``integer`` (``1e20`` is an integer beyond 64 bits).
    """
    exprs: list[pl.Expr] = []
    drop: list[str] = []
    for name, json_type in fixed_types(schema).items():
        if name not in frame.columns:
            continue
        expr = _typed(frame, name, json_type)
        if expr is not None:
            exprs.append(expr)
        if kind_column(name) in frame.columns:
            drop.append(kind_column(name))
    if exprs:
        frame = frame.with_columns(exprs)
    return frame.drop(drop) if drop else frame
