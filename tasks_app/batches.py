"""DATA_PROCESSING in batches: stage the input, fan out as a Celery chord, merge.

1. Stage (the task's own attempt): stream the source and write it as batches of
   ``batch_size`` rows (Arrow IPC files in the artifacts storage), one ``DataBatch`` row each,
   under one ``DataJob``. A small inline input skips all this and runs in the attempt itself.
   The ``DataJob`` row exists before the first file is written (with ``batches`` 0 until the
   staging is recorded), so the expiry sweep finds the files of an attempt that died while
   staging. At most ``QW_DATA_MAX_BATCHES`` batches: a larger input gets a larger batch size
   (the result is the same whatever the batching). The staged bytes count against the
   owner's artifact quota while they are written.
   A CSV file is not parsed here: a scan that counts its records (quotes kept in mind) cuts it
   into byte ranges of ``batch_size`` records, and each batch parses its own range in its own
   process (``DataBatch.source`` is then ``<file>#csv=<header bytes>,<range bytes>``). The rows,
   their numbers and the stats are the ones serial staging gives. A file the scan cannot cut
   (a quote left open, no header line) and JSON sources are staged in order as above.
2. Fan out: a chord of ``data_batch_task`` (one per batch not yet DONE) whose callback is
   ``data_merge_task``. The attempt then ends ``Deferred``: the task stays PROCESSING.
3. Each batch runs the row-wise part of the pipeline and writes its output; its row turns DONE
   (or FAILED with the reason). A failed read or write retries that batch alone.
4. The merge runs the rest (dedupe, sort, aggregate, limit) over the outputs in batch order and
   completes the task, fenced by the attempt: only when every batch row is DONE. The database,
   not the chord, decides: if the callback is lost, the lease expires, the sweep retries the
   task, and the next attempt finds the staged batches and the DONE outputs and carries on.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from enum import StrEnum
from itertools import islice
from typing import IO, Any, Literal

import polars as pl
from celery import chord
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from tasks_app import artifacts, data, sources, state, worker
from tasks_app.errors import Deferred, PermanentError, RetryableError
from tasks_app.models import Artifact, BatchStatus, DataBatch, DataJob, Task, TaskLog, TaskStatus

logger = logging.getLogger(__name__)


class BatchOutcome(StrEnum):
    """What became of one batch (``batch_run``), and a merge that must wait (``merge_run``)."""

    DONE = "done"
    DONE_ALREADY = "done already"  # a redelivered batch
    FAILED = "failed"  # its rows broke the pipeline: the task fails naming them
    SKIPPED = "skipped"  # the task is no longer running, or a cancel was asked
    GONE = "gone"  # no such batch (the task's work was removed)
    WAITING = "waiting"  # the merge ran before every batch was DONE


def process(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The DATA_PROCESSING handler's body (see the module docstring)."""
    task: Task = ctx.task
    operations = payload.get("operations", [])
    batch_size = payload.get("batch_size", settings.QW_DATA_BATCH_SIZE)
    job = DataJob.objects.filter(task=task).first()
    if job is None or job.batches == 0:  # not staged, or its staging never finished
        with sources.opened(task, payload) as source:
            if source.records is not None and len(source.records) <= batch_size:
                plan = _run(lambda: data.Plan.from_operations(operations))
                frame = _run(lambda: data.frame_from_records(source.records or []))
                part = _run(lambda: plan.run_batch(frame, first_row=0))
                return finish_merge(task, payload, plan, [part], batches=1)
            job = stage(task, source, batch_size)
        ctx.log(
            "data_staged",
            f"{job.rows_in} rows from {source.description} in {job.batches} batches",
            {"rows": job.rows_in, "batches": job.batches},
        )
    # A new attempt gives failed batches another chance (a manual retry, say).
    DataBatch.objects.filter(job=job, status=BatchStatus.FAILED).update(
        status=BatchStatus.PENDING, error=""
    )
    pending = list(job.batch_rows.exclude(status=BatchStatus.DONE).values_list("index", flat=True))
    if job.batches == 1 and pending:  # one batch needs no chord: run it in this attempt
        outcome = batch_run(str(task.id), 0)
        if outcome == BatchOutcome.FAILED:
            raise PermanentError(DataBatch.objects.get(job=job, index=0).error)
        if outcome not in (BatchOutcome.DONE, BatchOutcome.DONE_ALREADY):
            ctx.check_cancelled()  # raises TaskCancelled when a cancel is why it did not run
            raise RetryableError(f"the batch did not run: {outcome}")
        pending = []
    if not pending:
        return merge(task, payload, job)
    dispatch(task, pending)
    # The batches may wait behind other work: the lease runs from now, and each finished
    # batch renews it, so that only a task whose batches stop making progress expires.
    state.renew_lease(task.pk, seconds=_lease_s(task))
    ctx.log(
        "batches_dispatched",
        f"{len(pending)} of {job.batches} batches sent as a chord",
        {"pending": len(pending), "batches": job.batches},
    )
    raise Deferred(f"{len(pending)} of {job.batches} batches dispatched")


def _run(step: Any) -> Any:
    try:
        return step()
    except data.DataError as exc:
        raise PermanentError(str(exc)) from None


# --- 1. stage ----------------------------------------------------------------------------------


def stage(task: Task, source: sources.Source, batch_size: int) -> DataJob:
    """Write the source as batch files and record them; a concurrent attempt's staging wins."""
    prefix = f"{artifacts.work_prefix(task.id)}/a{task.attempt}"
    DataJob.objects.get_or_create(task=task, defaults={"batches": 0, "rows_in": 0})
    try:
        schema = None
        ranged = _csv_ranges(task, source, batch_size, prefix)
        if ranged is not None:
            batches = ranged
        else:
            schema, frames = _frames(task, source, batch_size)
            batches = _write_batches(task, frames, prefix)
    except Exception:
        artifacts.delete_tree(prefix)  # a hard kill leaves them to the sweep, by the DataJob
        raise
    rows_in = sum(batch.rows for batch in batches)
    with transaction.atomic():
        job, _ = DataJob.objects.select_for_update().get_or_create(
            task=task, defaults={"batches": 0, "rows_in": 0}
        )
        won = job.batches == 0
        if won:
            job.batches, job.rows_in = len(batches), rows_in
            job.schema = schema.to_json() if schema is not None else None
            job.save(update_fields=["batches", "rows_in", "schema"])
            for batch in batches:
                batch.job = job
            DataBatch.objects.bulk_create(batches)
    if not won:
        artifacts.delete_tree(prefix)
    return job


RANGE_MARK = "#csv="


def _csv_ranges(
    task: Task, source: sources.Source, batch_size: int, prefix: str
) -> list[DataBatch] | None:
    """A CSV file's batches as byte ranges of the file, each parsed by its own batch; None
    when the file is to be staged in order instead (see ``data.csv_layout``).

    The scan counts the records without parsing them, so that each range holds the rows that
    serial staging would have put in that batch: the same ``first_row``, the same stats. A
    downloaded file is stored once, as the batches' common input (it counts against the
    owner's quota as staged batches do); an artifact is read where it is.
    """
    file = source.file
    if file is None or source.fmt != "csv":
        return None
    layout = _run(
        lambda: data.csv_layout(
            file, batch_size, size_for=lambda rows: _capped_batch_size(task, rows, batch_size)
        )
    )
    file.seek(0)
    if layout is None:
        return None
    name = source.name
    if name is None:
        room = artifacts.quota_room(task.owner_id)
        if room is not None and file.seek(0, 2) > room:
            raise artifacts.QuotaExceeded(settings.QW_ARTIFACT_QUOTA_BYTES)
        name, _ = artifacts.save(f"{prefix}/in/source.csv", file)
    head = f"{name}{RANGE_MARK}{layout.header_start}-{layout.header_end},"
    return [
        DataBatch(
            index=index,
            first_row=part.first_row,
            rows=part.rows,
            source=f"{head}{part.start}-{part.end}",
        )
        for index, part in enumerate(layout.ranges)
    ]


def _read_input(batch: DataBatch, plan: data.Plan) -> pl.DataFrame:
    """A batch's input: its staged Arrow file (only the columns ``plan`` needs), or its byte
    range of a CSV file (a ``DataError`` names what is wrong with its rows)."""
    name, _, spans = batch.source.partition(RANGE_MARK)
    with artifacts.reading(name) as handle:
        if not spans:
            columns = plan.input_columns(pl.read_ipc_schema(handle))
            handle.seek(0)
            return pl.read_ipc(handle, columns=columns)
        header, rows = spans.split(",")
        header_start, header_end = (int(value) for value in header.split("-"))
        start, end = (int(value) for value in rows.split("-"))
        try:
            frame = data.read_csv_range(
                handle, header_start, header_end, start, end, batch.first_row
            )
        except (pl.exceptions.PolarsError, UnicodeDecodeError, ValueError) as exc:
            raise data.DataError(f"source: cannot read it: {exc}") from None
    if frame.height != batch.rows:
        raise data.DataError(
            f"source: the batch's bytes hold {frame.height} rows, {batch.rows} when it was staged"
        )
    return frame


def _frames(task: Task, source: sources.Source, batch_size: int) -> tuple[Any, Iterable[Any]]:
    """The source's column types (``None``: read as text) and its batches as frames."""
    if source.records is not None:
        given = source.records
        schema = _run(lambda: data.infer_schema(given))
        size = _capped_batch_size(task, len(given), batch_size)
        return schema, (data.frame_from_records(chunk, schema) for chunk in _chunks(given, size))
    file = source.file
    assert file is not None
    if source.fmt == "csv":
        # A row takes at least one byte: count the lines only when the bytes could pass the cap.
        length = file.seek(0, 2)
        file.seek(0)
        rows = length
        if length > batch_size * settings.QW_DATA_MAX_BATCHES:
            rows = _count_lines(file) + 1
        return None, data.iter_csv_frames(file, _capped_batch_size(task, rows, batch_size))
    # Column types are decided over the whole input: one pass to learn them, one to split.
    fmt: Literal["json", "jsonl"] = "jsonl" if source.fmt == "jsonl" else "json"
    seen = 0

    def counted(records: Iterable[Any]) -> Iterator[Any]:
        nonlocal seen
        for record in records:
            seen += 1
            yield record

    schema = _run(lambda: data.infer_schema(counted(data.iter_json_records(file, fmt))))
    file.seek(0)
    size = _capped_batch_size(task, seen, batch_size)
    records = data.iter_json_records(file, fmt)
    return schema, (data.frame_from_records(chunk, schema) for chunk in _chunks(records, size))


def _capped_batch_size(task: Task, rows: int, batch_size: int) -> int:
    """``batch_size``, or more so that ``rows`` (an upper bound) make at most
    ``QW_DATA_MAX_BATCHES`` batches."""
    cap = settings.QW_DATA_MAX_BATCHES
    needed = -(-rows // cap)
    if needed <= batch_size:
        return batch_size
    TaskLog.objects.create(
        task=task,
        event="batch_size_raised",
        message=f"batch_size {batch_size} raised to {needed}: up to {rows} rows in at most "
        f"QW_DATA_MAX_BATCHES ({cap}) batches",
        data={"batch_size": needed, "asked": batch_size, "rows": rows, "attempt": task.attempt},
    )
    return needed


def _write_batches(task: Task, frames: Iterable[pl.DataFrame], prefix: str) -> list[DataBatch]:
    """Write each frame as a batch file; raise ``QuotaExceeded`` once they pass the owner's
    artifact quota."""
    room = artifacts.quota_room(task.owner_id)
    batches: list[DataBatch] = []
    first_row = 0
    for index, frame in enumerate(_run(lambda: _reading(frames))):
        name, size = artifacts.write(f"{prefix}/in/{index:06d}.arrow", frame.write_ipc)
        batches.append(DataBatch(index=index, first_row=first_row, rows=frame.height, source=name))
        first_row += frame.height
        if room is not None:
            room -= size
            if room < 0:
                raise artifacts.QuotaExceeded(settings.QW_ARTIFACT_QUOTA_BYTES)
    if not batches:  # an empty input is one empty batch: the pipeline still runs and reports
        name, _ = artifacts.write(f"{prefix}/in/000000.arrow", pl.DataFrame().write_ipc)
        batches.append(DataBatch(index=0, first_row=0, rows=0, source=name))
    return batches


def _reading(frames: Iterable[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    """Frames one at a time, so that a ``DataError`` raised while reading surfaces here."""
    try:
        yield from frames
    except data.DataError:
        raise
    except (pl.exceptions.PolarsError, UnicodeDecodeError, ValueError) as exc:
        raise data.DataError(f"source: cannot read it: {exc}") from None


def _chunks(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk


# --- 2. fan out --------------------------------------------------------------------------------


def dispatch(task: Task, indexes: list[int]) -> None:
    """Send one batch task per index, and the merge once they are all done (a chord).

    The Celery tasks are named, not imported: ``tasks_app.tasks`` runs this module, so this
    module does not import it back; the app resolves the names to the registered tasks.
    """
    from queueworker.celery import app

    batch_task, merge_task = "tasks_app.data_batch", "tasks_app.data_merge"
    header = [
        app.signature(batch_task, (str(task.id), index), immutable=True).set(
            queue=task.queue, priority=task.priority
        )
        for index in indexes
    ]
    callback = app.signature(merge_task, (str(task.id), task.attempt), immutable=True).set(
        queue=task.queue, priority=task.priority
    )
    try:
        chord(header)(callback)
    except (BrokerError, OSError) as exc:
        # The staged batches stay; the next attempt sends them again.
        raise RetryableError(f"could not send the batches: {exc}") from None


# --- 3. one batch ------------------------------------------------------------------------------


def batch_run(task_id: str, index: int) -> BatchOutcome:
    """Run one batch; return what became of it. Raises only what a retry may fix (I/O)."""
    batch = (
        DataBatch.objects.select_related("job__task")
        .filter(job_id=uuid.UUID(task_id), index=index)
        .first()
    )
    if batch is None:
        return BatchOutcome.GONE
    if batch.status == BatchStatus.DONE:
        return BatchOutcome.DONE_ALREADY
    task = batch.job.task
    if task.status != TaskStatus.PROCESSING or task.cancel_requested:
        logger.info("batch %d of task %s skipped: the task is %s", index, task_id, task.status)
        return BatchOutcome.SKIPPED
    plan = data.Plan.from_operations(task.payload.get("operations", []))
    try:
        frame = _read_input(batch, plan)
        result = plan.run_batch(frame, first_row=batch.first_row)
    except data.DataError as exc:
        return batch_failed(task_id, index, str(exc))
    except pl.exceptions.PolarsError as exc:
        return batch_failed(task_id, index, f"operations: {type(exc).__name__}: {exc}")
    compression: data.Compression = "uncompressed" if artifacts.is_local() else "lz4"
    name, _ = artifacts.write(
        f"{artifacts.work_prefix(task_id)}/out/{index:06d}.batch",
        lambda stream: result.write(stream, compression),
    )
    DataBatch.objects.filter(pk=batch.pk, status=BatchStatus.PENDING).update(
        status=BatchStatus.DONE, output=name, finished_at=timezone.now()
    )
    state.renew_lease(task.pk, seconds=_lease_s(task))
    return BatchOutcome.DONE


def _lease_s(task: Task) -> float:
    return task.timeout_s + settings.QW_LEASE_SECONDS


def batch_failed(task_id: str, index: int, error: str) -> BatchOutcome:
    DataBatch.objects.filter(
        job_id=uuid.UUID(task_id), index=index, status=BatchStatus.PENDING
    ).update(
        status=BatchStatus.FAILED, error=error[: worker.MAX_ERROR_CHARS], finished_at=timezone.now()
    )
    return BatchOutcome.FAILED


# --- 4. merge ----------------------------------------------------------------------------------


def merge_run(task_id: str, attempt: int) -> str:
    """The chord's callback: finish the task if every batch is DONE (``waiting`` if not)."""
    task = Task.objects.filter(pk=task_id).first()
    if task is None or task.status != TaskStatus.PROCESSING or task.attempt != attempt:
        return worker.OutcomeStatus.STALE
    if task.cancel_requested:
        return worker.finish_cancelled(task).status
    job = DataJob.objects.get(task=task)
    rows = list(job.batch_rows.all())
    failed = [batch for batch in rows if batch.status == BatchStatus.FAILED]
    if failed:
        first = failed[0]
        error = (
            f"batch {first.index} (rows {first.first_row}–{first.first_row + first.rows - 1}): "
            f"{first.error}"
        )
        return worker.finish_failed(task, error, retryable=False).status
    if any(batch.status != BatchStatus.DONE for batch in rows):
        return BatchOutcome.WAITING
    _log_merge_start(task, rows)
    try:
        result = merge(task, task.payload, job, outputs=[batch.output for batch in rows])
    except PermanentError as exc:
        return worker.finish_failed(task, str(exc), retryable=False).status
    outcome = worker.finish_completed(task, result).status
    if outcome == worker.OutcomeStatus.COMPLETED:
        cleanup(task.id)  # only once the task is done: a stale merge must not take its batches
    return outcome


def _log_merge_start(task: Task, rows: list[DataBatch]) -> None:
    """Log when the merge starts and how long after the batches it does (the chord's callback
    delivery: ``since_last_batch_s``), so that a task's log shows where its time went."""
    now = timezone.now()
    done = sorted(batch.finished_at for batch in rows if batch.finished_at is not None)
    since = {
        "since_first_batch_s": round((now - done[0]).total_seconds(), 3) if done else None,
        "since_last_batch_s": round((now - done[-1]).total_seconds(), 3) if done else None,
    }
    TaskLog.objects.create(
        task=task,
        event="merge_started",
        message=f"{len(rows)} batches done, the last {since['since_last_batch_s']} s ago",
        data={"batches": len(rows), **since, "attempt": task.attempt},
    )


def merge(
    task: Task, payload: dict[str, Any], job: DataJob, *, outputs: list[str] | None = None
) -> dict[str, Any]:
    """The merged result of a job whose batches are all DONE (``outputs``: their output files
    in batch order, when the caller has read them already)."""
    plan = _run(lambda: data.Plan.from_operations(payload.get("operations", [])))
    names = outputs
    if names is None:
        names = list(job.batch_rows.order_by("index").values_list("output", flat=True))

    def parts() -> Iterator[Any]:
        for name in names:
            with artifacts.reading(name) as handle:
                yield data.BatchResult.read(handle)

    return finish_merge(task, payload, plan, parts(), batches=job.batches)


def cleanup(task_id: Any) -> None:
    """Delete a finished task's staged batches (its outputs live on as artifacts). A task that
    completes in its own attempt leaves this to beat's sweep (``artifacts.expire``)."""
    artifacts.delete_tree(artifacts.work_prefix(task_id))
    DataJob.objects.filter(task_id=task_id).delete()


# --- the result --------------------------------------------------------------------------------


def finish_merge(
    task: Task, payload: dict[str, Any], plan: Any, parts: Iterable[Any], *, batches: int
) -> dict[str, Any]:
    """Merge the batch results into ``{stats, invalid_samples, rows | artifact}``,
    plus ``invalid_rows`` or ``invalid_artifact`` for ``on_invalid: collect``.

    The merge writes its rows to a temporary file, never to a list in memory: an inline result
    is read back from it when it fits ``QW_DATA_INLINE_MAX_BYTES``; anything larger becomes an
    artifact (as JSON Lines when inline was asked for).
    """
    want_inline = payload.get("output", "inline") == "inline"
    fmt = "jsonl" if want_inline else payload.get("output_format", "jsonl")
    collects = any(op.get("on_invalid") == "collect" for op in payload.get("operations", []))
    with (
        tempfile.SpooledTemporaryFile(max_size=artifacts.SPOOL_BYTES) as rows_file,
        tempfile.SpooledTemporaryFile(max_size=artifacts.SPOOL_BYTES) as invalid_file,
    ):
        merged = _run(
            lambda: plan.merge(
                parts,
                batches=batches,
                output=rows_file,
                output_format=fmt,
                invalid_output=invalid_file if collects else None,
            )
        )
        result: dict[str, Any] = {
            "stats": merged.stats,
            "invalid_samples": merged.invalid_samples,
        }
        rows_out = merged.stats["rows_out"]
        stored = _place(task, result, rows_file, fmt, want_inline, ("rows", "artifact"), rows_out)
        if collects:
            keys = ("invalid_rows", "invalid_artifact")
            try:
                _place(task, result, invalid_file, "jsonl", True, keys, None)
            except artifacts.QuotaExceeded:
                if stored is not None:  # the task fails: it leaves no half of its output
                    artifacts.artifact_delete(stored)
                raise
    return result


def _place(
    task: Task,
    result: dict[str, Any],
    file: IO[bytes],
    fmt: str,
    want_inline: bool,
    keys: tuple[str, str],
    rows: int | None,
) -> Artifact | None:
    """Put the rows of ``file`` in ``result`` inline, or store them as an artifact (returned);
    ``rows``: how many there are, when known (else the JSON Lines are counted)."""
    inline_key, artifact_key = keys
    size = file.tell()
    file.seek(0)
    limit = settings.QW_DATA_INLINE_MAX_BYTES
    if want_inline and size <= limit:
        result[inline_key] = [json.loads(line) for line in file if line.strip()]
        return None
    if want_inline:
        TaskLog.objects.create(
            task=task,
            event="output_stored",
            message=f"{inline_key} exceed QW_DATA_INLINE_MAX_BYTES ({limit} bytes): stored as "
            "an artifact (JSON Lines)",
            data={"bytes": size, "attempt": task.attempt},
        )
    if rows is None:
        rows = _count_lines(file)
    label = "rows" if inline_key == "rows" else "invalid"
    artifact = artifacts.artifact_create(task=task, fmt=fmt, file=file, rows=rows, label=label)
    result[artifact_key] = artifacts.describe(artifact)
    return artifact


def _count_lines(file: IO[bytes]) -> int:
    file.seek(0)
    count = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    file.seek(0)
    return count
