"""The DATA_PROCESSING engine: pure data pipelines on Polars (no Django, no database, no Celery).

The plumbing reads a source into frames, runs a ``Plan`` over batches (in parallel processes)
and merges the batch results; this package does everything between bytes in and rows out.

Typing rules (a column has one type over the whole input, never per batch):

* CSV: every field is a string exactly as in the file; no type inference (it would depend on
  which batch a row lands in). An empty field is ``""``, not null. Use ``cast`` for numbers,
  booleans and dates; for JSON Schema a CSV value is a string (``"42"`` is not an integer),
  and every header column is present in every row.
* JSON, JSON Lines and inline records: a field's type is decided over the whole input
  (``SchemaBuilder`` streams it once; ``frame_from_records`` builds every batch with that
  schema): ints → Int64; ints and floats → Float64; bools → Boolean; strings → String;
  objects → Struct and arrays → List (typed the same way inside); values of mixed JSON kinds →
  String holding their text (``1``, ``true``, ``{"a":1}``), as Polars' own supertype would,
  and at the top level the engine remembers each value's JSON kind, so that ``validate``
  judges ``"34"`` and ``34`` apart; after it, a field that the schema gives one type
  (``integer``, ``number``, ``string``, ``boolean``) has a column of that type.
  A key missing from a record is null, and the engine remembers that it was missing, because
  JSON Schema's ``required`` tells a missing key from an explicit null.
* Outputs are strict JSON: dates ``YYYY-MM-DD``, datetimes ISO 8601, NaN and ±inf → null.

Public interface::

    DataError                                     # message names operations[i]…
    Schema, SchemaBuilder, infer_schema(rows), frame_from_records(rows, schema=None)
    iter_csv_frames(file_or_path, batch_size), iter_json_records(binary_file, "json"|"jsonl")
    csv_layout(seekable_file, batch_size) → CsvLayout(ranges) | None; read_csv_range(file, …)
    write_rows(frame, binary_file, "jsonl"|"csv"|"json"), RowWriter, to_records(frame)
    Plan.from_operations(operations) → plan.run_batch(frame, first_row=…) → BatchResult
    BatchResult.write(binary_file, compression) / BatchResult.read(binary_file)
    plan.merge(parts, batches=…, output=None, output_format="jsonl", invalid_output=None)
        → MergeResult(frame, stats, invalid_samples, invalid_frame), .as_result()
    run_single(operations, frame)                 # one batch + merge: the reference
    PAYLOAD_SCHEMA, payload_problems(payload), operations_problems(operations)

Each operation's semantics are in its module: ``schema_check`` (validate), ``rowwise``
(clean, rename, select, rejections), ``cast``, ``filtering``, ``global_ops`` (dedupe, sort,
aggregate, limit); ``plan`` splits a pipeline between batches and the merge.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from tasks_app.data.payload import PAYLOAD_SCHEMA, operations_problems, payload_problems

if TYPE_CHECKING:
    from tasks_app.data.core import DataError
    from tasks_app.data.plan import Plan, run_single
    from tasks_app.data.readers import (
        CsvLayout,
        CsvRange,
        csv_layout,
        iter_csv_frames,
        iter_json_records,
        read_csv_range,
    )
    from tasks_app.data.results import BatchResult, Compression, MergeResult
    from tasks_app.data.rowwise import invalid_rows
    from tasks_app.data.schema import Schema, SchemaBuilder, frame_from_records, infer_schema
    from tasks_app.data.writers import RowWriter, json_ready, to_records, write_rows

# The engine's names, imported on first use: the payload check above is all that the web,
# beat and Flower need, and the rest loads Polars (docs/performance.md, "Process sizes").
_LAZY = {
    "DataError": "core",
    "Plan": "plan",
    "run_single": "plan",
    "CsvLayout": "readers",
    "CsvRange": "readers",
    "csv_layout": "readers",
    "iter_csv_frames": "readers",
    "iter_json_records": "readers",
    "read_csv_range": "readers",
    "BatchResult": "results",
    "Compression": "results",
    "MergeResult": "results",
    "invalid_rows": "rowwise",
    "Schema": "schema",
    "SchemaBuilder": "schema",
    "frame_from_records": "schema",
    "infer_schema": "schema",
    "RowWriter": "writers",
    "json_ready": "writers",
    "to_records": "writers",
    "write_rows": "writers",
}


def __getattr__(name: str) -> Any:
    """Load an engine name (and Polars with it) when something first asks for it."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "PAYLOAD_SCHEMA",
    "BatchResult",
    "Compression",
    "CsvLayout",
    "CsvRange",
    "DataError",
    "MergeResult",
    "Plan",
    "RowWriter",
    "Schema",
    "SchemaBuilder",
    "csv_layout",
    "frame_from_records",
    "infer_schema",
    "invalid_rows",
    "iter_csv_frames",
    "iter_json_records",
    "json_ready",
    "operations_problems",
    "payload_problems",
    "read_csv_range",
    "run_single",
    "to_records",
    "write_rows",
]
