"""JSON Schema (Draft 2020-12) over a frame: one vectorised validity mask per batch.

Each row is the JSON object that ``to_records`` would give for it, without the keys the input
record did not have. The common keywords compile to Polars expressions: ``type`` (names or
lists, ``"null"`` included), ``enum``, ``const``, ``required``, ``properties``,
``additionalProperties``, ``minProperties``/``maxProperties``, ``dependentRequired``,
``minimum``/``maximum``/``exclusive*``, ``minLength``/``maxLength`` (code points), ``pattern``,
``multipleOf`` (integers), ``allOf``/``anyOf``/``oneOf``/``not`` and ``if``/``then``/``else``;
keywords for another JSON type than the value's never fail, as in the specification.

What does not compile is checked row by row, as narrowly as possible: a property's subschema
on that column's values (each distinct value once), else the row's whole subschema; a schema
with references (``$ref``, ``$defs``, ``$id``…) is checked whole, row by row. Row-wise checks
use jsonschema-rs, or the ``jsonschema`` library when the schema has a ``pattern`` (their
regular-expression dialects differ; ``jsonschema`` is the reference). A compiled ``pattern``
runs on Polars' regex engine and is compiled only when it uses syntax both engines read alike.
``format`` is an annotation, as Draft 2020-12 says by default.

Why a row failed is always ``jsonschema``'s own account (its best error: path and message),
computed only for the rows that are sampled.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import jsonschema_rs
import polars as pl
from jsonschema.exceptions import best_match

from tasks_app.data.core import PREFIX, has_column, json_path, visible
from tasks_app.data.schema_compile import REFERENCES, Compiler, Residual, mentions
from tasks_app.data.writers import json_ready


def _row_validator(schema: Any) -> Any:
    if mentions(schema, {"pattern", "patternProperties"}):
        return jsonschema.Draft202012Validator(schema)
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=False)


def records_for_validation(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Each row as the JSON object that the schema sees: keys the input lacked are left out."""
    records = json_ready(frame).to_dicts()
    for name in visible(frame):
        if has_column(name) in frame.columns:
            flags = frame.get_column(has_column(name)).to_list()
            for record, has in zip(records, flags, strict=True):
                if not has:
                    del record[name]
    return records


def _residual_values(frame: pl.DataFrame, residual: Residual) -> pl.Series:
    validator = _row_validator(residual.schema)
    if residual.field is None:
        verdicts = [validator.is_valid(r) for r in records_for_validation(frame)]
    else:
        values = json_ready(frame.select(residual.field)).to_series().to_list()
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


def reason(schema: Any, record: dict[str, Any]) -> str:
    """Why ``record`` fails ``schema``: the reference validator's best error."""
    error = best_match(jsonschema.Draft202012Validator(schema).iter_errors(record))
    if error is None:
        try:
            jsonschema_rs.Draft202012Validator(schema, validate_formats=False).validate(record)
        except jsonschema_rs.ValidationError as exc:
            return str(exc.message)
        return "does not match the schema"
    path = json_path(error.absolute_path)
    return f"{path}: {error.message}" if path else error.message
