"""A pipeline split for batches: row-wise work per batch, the rest in one merge.

1. Operations before the first global one (``dedupe``, ``sort``, ``aggregate``, ``limit``)
   run in every batch; their stats add up over batches.
2. The first global operation runs partly in each batch (see ``global_ops``) to keep batch
   results small, and the merge folds those partial results in batch order, one part at a
   time, then finishes it.
3. Every later operation runs in the merge, on the finished rows.

The merged result equals a one-batch run (``run_single``) for every pipeline: the same rows in
the same order, the same stats and the same invalid samples (the first 20 by input row), up
to the rounding of float sums. With ``on_invalid: fail`` the error names the first invalid row
of the batch that found one; batches run in parallel, so which batch that is may vary.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import polars as pl

import tasks_app.data.global_ops as global_ops
from tasks_app.data.cast import cast
from tasks_app.data.core import (
    OP,
    ROW,
    DataError,
    companions,
    has_column,
    is_hidden,
    kind_column,
    op_path,
    strip_hidden,
)
from tasks_app.data.filtering import filter_rows
from tasks_app.data.global_ops import GLOBAL
from tasks_app.data.payload import operations_problems
from tasks_app.data.results import BatchResult, MergeResult
from tasks_app.data.rowwise import (
    Step,
    clean,
    first_samples,
    invalid_rows,
    merge_rejected,
    rename,
    select,
    validate,
    with_row_numbers,
)
from tasks_app.data.writers import OutputFormat, RowWriter

ROWWISE: dict[str, Callable[[pl.DataFrame, dict[str, Any], int], Step]] = {
    "validate": validate,
    "clean": clean,
    "rename": rename,
    "select": select,
    "cast": cast,
    "filter": filter_rows,
}


def _run_op(frame: pl.DataFrame, op: dict[str, Any], index: int) -> Step:
    """One operation on rows all at hand; polars' own errors name the operation too."""
    try:
        if op["op"] in ROWWISE:
            step = ROWWISE[op["op"]](frame, op, index)
        else:
            result = global_ops.apply(frame, op, index)
            step = Step(result, {"rows_in": frame.height, "rows_out": result.height})
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{op_path(index)} ({op['op']}): {str(exc).splitlines()[0]}") from exc
    step.stats = {"op": op["op"], **step.stats}
    return step


def _add_stats(total: list[dict[str, Any]], part: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not total:
        return [dict(stats) for stats in part]
    for mine, theirs in zip(total, part, strict=True):
        for key, value in theirs.items():
            if key != "op":
                mine[key] = mine.get(key, 0) + value
    return total


def _where_fields(node: dict[str, Any]) -> set[str]:
    if "field" in node:
        return {node["field"]}
    return {
        field for child in node.get("all", node.get("any", [])) for field in _where_fields(child)
    }


@dataclass(frozen=True)
class Plan:
    operations: tuple[dict[str, Any], ...]
    split: int  # index of the first global operation (len(operations) if none)

    @classmethod
    def from_operations(cls, operations: list[dict[str, Any]]) -> Plan:
        problems = operations_problems(operations)
        if problems:
            raise DataError("; ".join(f"{path}: {message}" for path, message in problems))
        split = next((i for i, op in enumerate(operations) if op["op"] in GLOBAL), len(operations))
        return cls(tuple(operations), split)

    def _needed(self) -> set[str] | None:
        """The fields the merge needs, when the operations from the first global one on say.

        A batch drops the other fields before its partial result, so that a ``dedupe`` or
        ``sort`` feeding an ``aggregate`` or a ``select`` ships only what they read. None: all
        (the final rows, or an operation whose samples show whole rows).
        """
        fields: set[str] = set()
        for op in self.operations[self.split :]:
            name = op["op"]
            if name == "aggregate":
                metrics = {field for spec in op["metrics"].values() for field in spec.values()}
                return fields | set(op.get("group_by", [])) | (metrics - {"*"})
            if name == "select":
                return fields | set(op["fields"])
            if name == "dedupe":
                fields |= set(op["keys"])
            elif name == "sort":
                fields |= {spec["field"] for spec in op["by"]}
            elif name == "filter":
                fields |= _where_fields(op["where"])
            elif name == "clean":
                fields |= {*op.get("drop_null", []), *op.get("lower", []), *op.get("upper", [])}
            elif name != "limit":
                return None
        return None

    def input_columns(self, columns: Iterable[str]) -> list[str] | None:
        """Which of a staged input's ``columns`` a batch needs to read; None: all of them.

        Only the fields that the operations read are needed when none of those that run in
        the batch shows or keeps a whole row: ``filter`` and ``clean`` only, up to a
        ``select`` or to the first global operation when ``_needed`` names its fields
        (``validate`` and ``cast`` show whole rows in their invalid samples, ``rename`` moves
        names). The fields ``clean`` names are read even when nothing later needs them, so
        that its errors stay the same (``lower`` of a number fails). A field's hidden
        companions (presence, JSON kind) come with it; at least one column is read, for the
        row count. Reading fewer columns of a staged Arrow file is less I/O and less memory.
        """
        fields: set[str] = set()
        for op in self.operations[: self.split]:
            name = op["op"]
            if name == "select":
                fields |= set(op["fields"])
                break
            if name == "filter":
                fields |= _where_fields(op["where"])
            elif name == "clean":
                fields |= {*op.get("drop_null", []), *op.get("lower", []), *op.get("upper", [])}
            else:
                return None
        else:
            needed = self._needed() if self.split < len(self.operations) else None
            if needed is None:
                return None
            fields |= needed
        names = list(columns)
        if not names:
            return None
        wanted = fields | {
            hidden(field) for field in fields for hidden in (has_column, kind_column)
        }
        kept = [name for name in names if name in wanted]
        return kept or names[:1]

    def _following(self) -> dict[str, Any] | None:
        return self.operations[self.split + 1] if self.split + 1 < len(self.operations) else None

    def _run(
        self, frame: pl.DataFrame, indexes: range, stats: list[dict[str, Any]], sink: _Rejections
    ) -> pl.DataFrame:
        for index in indexes:
            step = _run_op(frame, self.operations[index], index)
            frame = step.frame
            stats.append(step.stats)
            for rejected in step.rejected:
                sink.add(rejected.samples, rejected.frame)
        return frame

    def _collects(self) -> bool:
        return any(op.get("on_invalid") == "collect" for op in self.operations)

    def run_batch(self, frame: pl.DataFrame, *, first_row: int) -> BatchResult:
        """Run one batch; ``first_row`` is the global index of its first row."""
        frame = with_row_numbers(frame, first_row)
        rows_in = frame.height
        stats: list[dict[str, Any]] = []
        sink = _Rejections(None)
        frame = self._run(frame, range(self.split), stats, sink)
        if self.split < len(self.operations):
            op = self.operations[self.split]
            stats.append({"op": op["op"], "rows_in": frame.height})
            needed = self._needed()
            if needed is not None:
                presence = [c for n in needed if n in frame.columns for c in companions(frame, n)]
                fields = [c for c in frame.columns if c in needed or c == ROW]
                frame = frame.select(fields + presence)
            frame = global_ops.partial(frame, op, self.split, self._following())
        return BatchResult(
            frame=frame,
            stats={"rows_in": rows_in, "operations": stats},
            invalid_samples=sink.samples,
            invalid_frame=merge_rejected(sink.frames) if self._collects() else None,
        )

    def merge(
        self,
        parts: Iterable[BatchResult],
        *,
        batches: int,
        output: IO[bytes] | None = None,
        output_format: OutputFormat = "jsonl",
        invalid_output: IO[bytes] | None = None,
    ) -> MergeResult:
        """Merge the batches' results, given in batch order (an iterator is read once).

        With ``output`` the final rows are written there (``output_format``) instead of being
        returned, and a pipeline without global operations then never holds more than one
        batch; with ``invalid_output`` the collected invalid rows go there as JSON Lines of
        ``{"row", "operation", "record"}`` (see ``invalid_rows``).
        """
        iterator = iter(parts)
        first = next(iterator, None)
        if first is None:
            # No batch at all (an empty source): run the pipeline over no rows once.
            first = self.run_batch(pl.DataFrame(), first_row=0)
        writer = RowWriter(output, output_format) if output is not None else None
        sink = _Rejections(invalid_output)
        op = self.operations[self.split] if self.split < len(self.operations) else None
        count = rows_in = 0
        stats: list[dict[str, Any]] = []
        held: pl.DataFrame | None = None
        frames: list[pl.DataFrame] = []
        # A dedupe or a whole sort keeps (nearly) every row: folding batch by batch would go
        # over the rows held once per batch; they are gathered and gone over once instead.
        at_once = op is not None and (
            op["op"] == "dedupe"
            or (op["op"] == "sort" and (self._following() or {}).get("op") != "limit")
        )
        for part in itertools.chain([first], iterator):
            count += 1
            rows_in += part.stats["rows_in"]
            stats = _add_stats(stats, part.stats["operations"])
            sink.add(part.invalid_samples, part.invalid_frame)
            if op is not None and not at_once:
                held = global_ops.combine(held, part.frame, op, self.split, self._following())
            elif writer is not None and op is None:
                writer.write(part.frame)
            else:
                frames.append(part.frame)
        if batches and count != batches:
            raise ValueError(f"merge got {count} batch results for {batches} batches")
        if at_once and op is not None:
            held = global_ops.combine_all(frames, op, self.split, self._following())
            frames = []
        if op is not None and held is not None:
            frame = global_ops.finish(held, op, self.split)
            stats[self.split]["rows_out"] = frame.height
        else:
            frame = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        frame = self._run(frame, range(self.split + 1, len(self.operations)), stats, sink)
        if op is not None and op["op"] == "sort":
            # Batches kept only the top rows for a following limit; the sort itself drops none.
            stats[self.split]["rows_out"] = stats[self.split]["rows_in"]
            if len(stats) > self.split + 1:
                stats[self.split + 1]["rows_in"] = stats[self.split]["rows_in"]
        rows_out = frame.height
        if writer is not None:
            if op is not None:
                writer.write(frame)
            writer.close()
            rows_out = writer.rows
        sink.close()
        return MergeResult(
            frame=strip_hidden(frame) if writer is None else None,
            stats={
                "rows_in": rows_in,
                "rows_out": rows_out,
                "invalid": sum(s.get("invalid", 0) for s in stats),
                "batches": batches,
                "operations": stats,
            },
            invalid_samples=sink.samples,
            invalid_frame=sink.result() if self._collects() else None,
        )


class _Rejections:
    """The first 20 invalid samples by row, and the collected invalid rows (kept or written)."""

    def __init__(self, output: IO[bytes] | None) -> None:
        self.samples: list[dict[str, Any]] = []
        self.frames: list[pl.DataFrame] = []
        self._writer = RowWriter(output, "jsonl") if output is not None else None

    def add(self, samples: list[dict[str, Any]], frame: pl.DataFrame | None) -> None:
        if samples:
            self.samples = first_samples(self.samples + samples)
        if frame is None:
            return
        frame = frame.drop([c for c in frame.columns if is_hidden(c) and c not in (ROW, OP)])
        if self._writer is not None:
            self._writer.write(invalid_rows(frame))
        else:
            self.frames.append(frame)

    def result(self) -> pl.DataFrame | None:
        """The collected rows as ``invalid_rows``; None when they were written out."""
        if self._writer is not None:
            return None
        return invalid_rows(merge_rejected(self.frames))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def run_single(operations: list[dict[str, Any]], frame: pl.DataFrame) -> MergeResult:
    """The whole pipeline over one frame: one batch, then the merge."""
    plan = Plan.from_operations(operations)
    return plan.merge([plan.run_batch(frame, first_row=0)], batches=1)


__all__ = ["Plan", "run_single"]
