"""DATA_PROCESSING around the engine: create-time checks, sources, batches, merge, results.

The chord itself runs in tests/integration/test_data_processing.py; here each of its parts
(stage, one batch, the merge) is called as a worker would call it, against the database and
a storage folder of the test.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from tasks_app import artifacts, batches, data, recovery, sources, worker
from tasks_app.errors import PermanentError
from tasks_app.http.testing import LoopbackServer, Reply
from tasks_app.models import Artifact, BatchStatus, DataBatch, DataJob, Task, TaskLog, TaskStatus
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PEOPLE = [
    {
        "id": i,
        "email": f" User{i % 7}@Example.com ",
        "country": "DE" if i % 3 else "FR",
        "age": 20 + i,
    }
    for i in range(25)
]
PIPELINE = [
    {"op": "clean", "trim": True, "lower": ["email"]},
    {"op": "dedupe", "keys": ["email"], "keep": "last"},
    {
        "op": "aggregate",
        "group_by": ["country"],
        "metrics": {"n": {"count": "*"}, "age": {"sum": "age"}},
    },
]


@pytest.fixture(autouse=True)
def _storage(artifact_root):
    return artifact_root


def _create(api, payload: dict[str, Any], **extra: Any):
    return api.post(
        "/api/tasks/", {"type": "DATA_PROCESSING", "payload": payload, **extra}, format="json"
    )


def _created(api, payload: dict[str, Any]) -> Task:
    response = _create(api, payload)
    assert response.status_code == 201, response.content
    return Task.objects.get(pk=response.json()["id"])


class Chord:
    """Stands in for the broker: records which batches a chord would have sent."""

    def __init__(self) -> None:
        self.sent: list[list[int]] = []

    def __call__(self, task: Task, indexes: list[int]) -> None:
        self.sent.append(list(indexes))


@pytest.fixture
def chord(monkeypatch) -> Chord:
    recorder = Chord()
    monkeypatch.setattr(batches, "dispatch", recorder)
    return recorder


def _run(task: Task) -> worker.Outcome:
    """Run the task's next attempt as a worker would; ``task`` is refreshed afterwards."""
    outcome = worker.run(str(task.id), timeout_s=task.timeout_s)
    task.refresh_from_db()
    return outcome


# --- create-time checks ------------------------------------------------------------------------


def test_create_with_a_bad_operation_names_its_path_and_writes_nothing(api):
    before = Task.objects.count()
    response = _create(api, {"records": [], "operations": [{"op": "filter", "where": {"gte": 1}}]})
    assert response.status_code == 400
    assert "operations[0].where.field" in json.dumps(response.json()["payload"])
    assert Task.objects.count() == before


@pytest.mark.parametrize(
    "source",
    [
        "http://127.0.0.1/people.csv",
        {"url": "http://169.254.169.254/latest/meta-data"},
        {"url": "http://[::1]:8080/x.json"},
        {"url": "http://10.1.2.3/x.csv"},
    ],
)
def test_create_with_a_source_url_inside_the_network_is_refused(api, source):
    response = _create(api, {"source": source, "operations": []})
    assert response.status_code == 400, response.content
    path = "source" if isinstance(source, str) else "source.url"
    assert path in json.dumps(response.json()["payload"])
    assert not Task.objects.exists()


def test_create_with_another_users_artifact_or_task_is_refused(api, user):
    other = UserFactory()
    theirs = Task.objects.create(owner=other, type="NOOP", queue="task.created")
    artifact = Artifact.objects.create(
        owner=other,
        name="results/x.jsonl",
        format="jsonl",
        content_type="x",
        expires_at=timezone.now(),
    )
    for source, path in (
        ({"task": str(theirs.id)}, "source.task"),
        ({"artifact": str(artifact.id)}, "source.artifact"),
    ):
        response = _create(api, {"source": source})
        assert response.status_code == 400
        assert path in json.dumps(response.json()["payload"])
    assert Task.objects.filter(owner=user).count() == 0


# --- small inputs run in the attempt ---------------------------------------------------------


def test_small_inline_records_complete_in_one_attempt_with_stats(api):
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE})
    assert _run(task).status == "completed"
    task.refresh_from_db()
    assert task.status == TaskStatus.COMPLETED
    reference = data.run_single(PIPELINE, data.frame_from_records(PEOPLE))
    assert task.result["rows"] == data.to_records(reference.frame)
    assert task.result["stats"]["rows_in"] == 25
    assert not DataJob.objects.exists()


def test_invalid_rows_with_on_invalid_fail_fail_the_task_at_once(api):
    operations = [{"op": "validate", "schema": {"required": ["missing"]}, "on_invalid": "fail"}]
    task = _created(api, {"records": PEOPLE, "operations": operations})
    assert _run(task).status == "failed"
    task.refresh_from_db()
    assert task.failure_class == "non_retryable"
    assert "operations[0]" in task.error


# --- batches -----------------------------------------------------------------------------------


def test_large_input_is_staged_in_batches_and_the_attempt_defers(api, chord):
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    outcome = _run(task)
    assert outcome.status == "deferred"
    job = DataJob.objects.get(task=task)
    assert (job.batches, job.rows_in) == (3, 25)
    assert list(job.batch_rows.values_list("first_row", "rows")) == [(0, 10), (10, 10), (20, 5)]
    assert chord.sent == [[0, 1, 2]]
    task.refresh_from_db()
    assert task.status == TaskStatus.PROCESSING  # until the merge finishes it
    assert "batches_dispatched" in TaskLog.objects.filter(task=task).values_list("event", flat=True)
    batches.batch_run(str(task.id), 1)
    reason = api.get(f"/api/tasks/{task.id}/").json()["wait_reason"]
    assert (reason["code"], reason["detail"]) == ("batches", "1 of 3 batches done (attempt 1).")


def test_batches_then_merge_equal_a_single_batch_run(
    api, chord, django_capture_on_commit_callbacks
):
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 4})
    _run(task)
    for index in chord.sent[0]:
        assert batches.batch_run(str(task.id), index) == "done"
    assert batches.batch_run(str(task.id), 0) == "done already"  # a redelivered batch
    with django_capture_on_commit_callbacks(execute=True):
        assert batches.merge_run(str(task.id), task.attempt) == "completed"
    task.refresh_from_db()
    reference = data.run_single(PIPELINE, data.frame_from_records(PEOPLE))
    assert task.result["rows"] == data.to_records(reference.frame)
    assert task.result["stats"]["batches"] == 7
    # the log tells when the merge started, and how long after the last batch
    started = TaskLog.objects.get(task=task, event="merge_started")
    assert started.data["batches"] == 7
    assert 0 <= started.data["since_last_batch_s"] <= started.data["since_first_batch_s"]
    # the staged work is gone once the task is done
    assert not DataJob.objects.filter(task=task).exists()
    assert artifacts.delete_tree(artifacts.work_prefix(task.id)) == 0


def test_merge_waits_while_a_batch_is_pending_and_a_stale_merge_does_nothing(api, chord):
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    _run(task)
    batches.batch_run(str(task.id), 0)
    assert batches.merge_run(str(task.id), task.attempt) == "waiting"
    assert batches.merge_run(str(task.id), task.attempt + 1) == "stale"
    assert Task.objects.get(pk=task.pk).status == TaskStatus.PROCESSING


def test_a_failed_batch_fails_the_task_naming_the_batch_and_its_rows(api, chord):
    # given a pipeline that fails on row 15 only, in the second of three batches
    schema = {"properties": {"id": {"not": {"const": 15}}}}
    operations = [{"op": "validate", "schema": schema, "on_invalid": "fail"}]
    task = _created(api, {"records": PEOPLE, "operations": operations, "batch_size": 10})
    _run(task)

    # when the batches run
    assert [batches.batch_run(str(task.id), index) for index in (0, 1, 2)] == [
        "done",
        "failed",
        "done",
    ]

    # then the merge fails the task at once, naming the batch, its rows and the row at fault
    assert batches.merge_run(str(task.id), task.attempt) == "failed"
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED
    assert task.error.startswith("batch 1 (rows 10–19): operations[0]")
    assert "row 15" in task.error


def test_a_lost_callback_is_finished_by_the_sweep_and_the_next_attempt(api, chord):
    # given every batch DONE but the chord's callback lost with its worker
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    _run(task)
    for index in chord.sent[0]:
        batches.batch_run(str(task.id), index)
    Task.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    # when the sweep expires the lease and the retry runs
    assert recovery.expire_leases() == 1
    Task.objects.filter(pk=task.pk).update(next_attempt_at=timezone.now())
    outcome = _run(task)

    # then the next attempt merges the DONE outputs without sending a batch again
    assert outcome.status == "completed"
    assert chord.sent == [[0, 1, 2]]
    task.refresh_from_db()
    reference = data.run_single(PIPELINE, data.frame_from_records(PEOPLE))
    assert task.result["rows"] == data.to_records(reference.frame)


def test_a_retried_attempt_sends_only_the_batches_not_done(api, chord):
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    _run(task)
    batches.batch_run(str(task.id), 1)
    Task.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    recovery.expire_leases()
    Task.objects.filter(pk=task.pk).update(next_attempt_at=timezone.now())
    assert _run(task).status == "deferred"
    assert chord.sent == [[0, 1, 2], [0, 2]]


def test_cancel_while_batches_run_ends_cancelled(api, chord):
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    _run(task)
    assert api.post(f"/api/tasks/{task.id}/cancel/").status_code == 202
    assert batches.batch_run(str(task.id), 0).startswith("skipped")
    assert batches.merge_run(str(task.id), task.attempt) == "cancelled"
    assert Task.objects.get(pk=task.pk).status == TaskStatus.CANCELLED


# --- results and artifacts ---------------------------------------------------------------------


def test_artifact_output_is_streamed_by_the_result_endpoint(api):
    task = _created(
        api,
        {
            "records": PEOPLE,
            "operations": [{"op": "select", "fields": ["id"]}],
            "output": "artifact",
        },
    )
    _run(task)
    task.refresh_from_db()
    assert "rows" not in task.result
    ref = task.result["artifact"]
    assert ref["rows"] == 25 and ref["format"] == "jsonl"
    response = api.get(f"/api/tasks/{task.id}/result/")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson"
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"id": i} for i in range(25)]


def test_inline_output_over_the_limit_is_stored_as_an_artifact(api, settings):
    settings.QW_DATA_INLINE_MAX_BYTES = 1024
    task = _created(api, {"records": PEOPLE * 4, "operations": []})
    _run(task)
    task.refresh_from_db()
    assert task.result["artifact"]["rows"] == 100
    assert "output_stored" in TaskLog.objects.filter(task=task).values_list("event", flat=True)


def test_result_endpoint_answers_inline_409_and_410(api):
    task = _created(api, {"records": PEOPLE[:2], "operations": []})
    assert api.get(f"/api/tasks/{task.id}/result/").status_code == 409
    _run(task)
    assert api.get(f"/api/tasks/{task.id}/result/").json()["rows"] == data.to_records(
        data.frame_from_records(PEOPLE[:2])
    )
    stored = _created(api, {"records": PEOPLE[:2], "operations": [], "output": "artifact"})
    _run(stored)
    Artifact.objects.filter(task=stored).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert artifacts.expire() == 1
    assert api.get(f"/api/tasks/{stored.id}/result/").status_code == 410


def test_another_task_result_and_an_artifact_are_sources(api):
    first = _created(
        api,
        {
            "records": PEOPLE,
            "operations": [{"op": "select", "fields": ["id", "country"]}],
            "output": "artifact",
        },
    )
    _run(first)
    artifact_id = Task.objects.get(pk=first.pk).result["artifact"]["id"]
    by_task = _created(
        api,
        {
            "source": {"task": str(first.id)},
            "operations": [{"op": "filter", "where": {"field": "country", "eq": "FR"}}],
        },
    )
    by_artifact = _created(
        api, {"source": {"artifact": artifact_id}, "operations": [{"op": "limit", "n": 2}]}
    )
    assert _run(by_task).status == "completed"
    assert _run(by_artifact).status == "completed"
    fr = [r for r in PEOPLE if r["country"] == "FR"]
    assert Task.objects.get(pk=by_task.pk).result["rows"] == [
        {"id": r["id"], "country": "FR"} for r in fr
    ]
    assert Task.objects.get(pk=by_artifact.pk).result["rows"] == [
        {"id": 0, "country": "FR"},
        {"id": 1, "country": "DE"},
    ]


def test_expiry_removes_the_work_of_tasks_finished_long_ago(api, chord):
    task = _created(api, {"records": PEOPLE, "operations": [], "batch_size": 10})
    _run(task)
    Task.objects.filter(pk=task.pk).update(
        status=TaskStatus.FAILED, finished_at=timezone.now() - timedelta(hours=2)
    )
    artifacts.expire()
    assert not DataJob.objects.exists() and not DataBatch.objects.exists()
    assert artifacts.delete_tree(artifacts.work_prefix(task.id)) == 0


def test_failed_batches_get_another_chance_on_a_manual_retry(api, chord):
    task = _created(api, {"records": PEOPLE, "operations": [], "batch_size": 10})
    _run(task)
    DataBatch.objects.filter(job_id=task.pk, index=2).update(
        status=BatchStatus.FAILED, error="disk"
    )
    for index in (0, 1):
        batches.batch_run(str(task.id), index)
    batches.merge_run(str(task.id), task.attempt)
    assert Task.objects.get(pk=task.pk).status == TaskStatus.FAILED
    assert api.post(f"/api/tasks/{task.id}/retry/").status_code == 202
    assert _run(task).status == "deferred"
    assert chord.sent[-1] == [2]


def test_each_finished_batch_renews_the_tasks_lease(api, chord):
    # given a deferred task whose lease is about to run out while its batches wait
    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    _run(task)
    soon = timezone.now() + timedelta(seconds=1)
    Task.objects.filter(pk=task.pk).update(lease_expires_at=soon)

    # when a batch finishes
    batches.batch_run(str(task.id), 0)

    # then the lease runs again from now, a whole time limit and margin ahead
    renewed = Task.objects.get(pk=task.pk).lease_expires_at
    assert renewed >= soon + timedelta(seconds=task.timeout_s)


def test_a_source_whose_rows_are_not_objects_fails_with_the_reason(api, chord):
    # given a finished task whose result is a list of numbers, read in batches
    other = _created(api, {"records": [], "operations": []})
    Task.objects.filter(pk=other.pk).update(status=TaskStatus.COMPLETED, result=[1, 2, 3])
    task = _created(api, {"source": {"task": str(other.id)}, "operations": [], "batch_size": 1})

    # when it runs, then it fails at once, saying what is wrong with the rows
    assert _run(task).status == "failed"
    assert task.failure_class == "non_retryable"
    assert "object" in task.error and not task.error.startswith("DataError")
    assert chord.sent == []


def test_a_single_staged_batch_is_not_run_once_a_cancel_is_requested(api, monkeypatch):
    # given a one-batch task from another task's result, cancelled as its attempt stages it
    first = _created(api, {"records": PEOPLE[:3], "operations": [], "output": "artifact"})
    _run(first)
    task = _created(api, {"source": {"task": str(first.id)}, "operations": []})
    staged = batches.stage

    def stage_then_cancel(*args, **kwargs):
        job = staged(*args, **kwargs)
        Task.objects.filter(pk=task.pk).update(cancel_requested=True)
        return job

    monkeypatch.setattr(batches, "stage", stage_then_cancel)

    # when the attempt goes on, then it ends CANCELLED, not COMPLETED
    assert _run(task).status == "cancelled"
    assert task.status == TaskStatus.CANCELLED


def test_work_of_a_task_that_completed_in_its_own_attempt_goes_at_the_next_sweep(api):
    # given a one-batch task from an artifact, completed in its own attempt
    first = _created(api, {"records": PEOPLE[:3], "operations": [], "output": "artifact"})
    _run(first)
    task = _created(api, {"source": {"task": str(first.id)}, "operations": []})
    assert _run(task).status == "completed"
    assert DataJob.objects.filter(task=task).exists()

    # when beat's sweep runs, then its staged work is gone at once (no grace)
    artifacts.expire()
    assert not DataJob.objects.filter(task=task).exists()
    assert artifacts.delete_tree(artifacts.work_prefix(task.id)) == 0


# --- resource caps -----------------------------------------------------------------------------


def _gzip(block: bytes, times: int) -> bytes:
    """``block`` repeated ``times`` times, gzipped without holding the whole in memory."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(block) for _ in range(times)]
    return b"".join([*parts, compressor.flush()])


@pytest.fixture
def server(settings) -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        settings.QW_HTTP_ALLOWED_HOSTS = [srv.netloc]
        yield srv


def test_a_gzip_bomb_stops_at_the_compression_ratio_before_filling_the_disk(server):
    # given 150 MiB of CSV that a 200 KB gzip body decodes to, under the default caps
    body = _gzip(b"0\n" * (1 << 19), 150)
    assert len(body) < 300 * 1024
    server.script("/bomb.csv", Reply(headers={"Content-Encoding": "gzip"}, body=body))

    # when it is fetched, then it is refused after a few MiB, not 150
    written = io.BytesIO()
    with pytest.raises(PermanentError, match="QW_DATA_MAX_COMPRESSION_RATIO"):
        sources.fetch(server.url("/bomb.csv"), written, timeout_s=10)
    assert written.tell() < 8 * 1024**2


def test_a_compressed_body_stops_at_the_decoded_cap(server, settings):
    settings.QW_DATA_MAX_COMPRESSION_RATIO = 0  # off: the decoded cap alone
    settings.QW_DATA_MAX_SOURCE_BYTES = 3 * 1024**2
    body = _gzip(b"0\n" * (1 << 19), 50)
    server.script("/big.csv", Reply(headers={"Content-Encoding": "gzip"}, body=body))
    written = io.BytesIO()
    with pytest.raises(PermanentError, match="QW_DATA_MAX_SOURCE_BYTES"):
        sources.fetch(server.url("/big.csv"), written, timeout_s=10)
    assert written.tell() <= 3 * 1024**2


def test_a_body_that_decodes_to_nothing_is_capped_on_the_bytes_received(server, settings):
    # given 400 KB of empty gzip members: nothing decoded, every byte received
    settings.QW_DATA_MAX_SOURCE_BYTES = 64 * 1024
    body = gzip.compress(b"") * 20_000
    server.script("/empty.csv", Reply(headers={"Content-Encoding": "gzip"}, body=body))
    with pytest.raises(PermanentError, match="QW_DATA_MAX_SOURCE_BYTES"):
        sources.fetch(server.url("/empty.csv"), io.BytesIO(), timeout_s=10)


def test_a_source_ordinarily_compressed_is_read_whole(server):
    rows = "".join(f"{i},name {i},{i * 7 % 13}\n" for i in range(50_000))
    text = "id,name,score\n" + rows
    server.script(
        "/people.csv",
        Reply(headers={"Content-Encoding": "gzip"}, body=gzip.compress(text.encode())),
    )
    written = io.BytesIO()
    sources.fetch(server.url("/people.csv"), written, timeout_s=10)
    assert written.getvalue() == text.encode()


def test_the_source_cap_defaults_to_one_gib(settings):
    if "QW_DATA_MAX_SOURCE_BYTES" in os.environ:
        pytest.skip("QW_DATA_MAX_SOURCE_BYTES is set in the environment")
    assert settings.QW_DATA_MAX_SOURCE_BYTES == 1024**3


def test_inline_records_over_the_batch_cap_are_refused_naming_batch_size(api, settings):
    settings.QW_DATA_MAX_BATCHES = 3
    response = _create(api, {"records": PEOPLE, "operations": [], "batch_size": 5})
    assert response.status_code == 400
    assert any(problem.startswith("batch_size") for problem in response.json()["payload"])
    assert "at least 9" in json.dumps(response.json()["payload"])
    assert not Task.objects.exists()
    assert _create(api, {"records": PEOPLE, "operations": [], "batch_size": 9}).status_code == 201


def _csv(rows: list[dict[str, Any]]) -> str:
    lines = [",".join(rows[0])] + [",".join(str(v) for v in row.values()) for row in rows]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "task"])
def test_a_source_over_the_batch_cap_is_staged_in_larger_batches_with_the_same_result(
    api, chord, server, settings, fmt, django_capture_on_commit_callbacks
):
    # given 25 rows from a source, batch_size 1, and at most 4 batches
    settings.QW_DATA_MAX_BATCHES = 4
    people = [{"id": r["id"], "email": r["email"].strip(), "country": r["country"]} for r in PEOPLE]
    bodies = {
        "csv": _csv(people),
        "json": json.dumps(people),
        "jsonl": "".join(json.dumps(row) + "\n" for row in people),
    }
    if fmt == "task":
        first = _created(api, {"records": people, "operations": []})
        _run(first)
        source: Any = {"task": str(first.id)}
    else:
        server.script(f"/people.{fmt}", Reply(body=bodies[fmt]))
        source = server.url(f"/people.{fmt}")
    task = _created(api, {"source": source, "operations": PIPELINE, "batch_size": 1})

    # when it is staged and run
    assert _run(task).status == "deferred"
    job = DataJob.objects.get(task=task)
    for index in chord.sent[0]:
        assert batches.batch_run(str(task.id), index) == "done"
    with django_capture_on_commit_callbacks(execute=True):
        assert batches.merge_run(str(task.id), task.attempt) == "completed"

    # then it made at most 4 batches, said so, and the result is a single run's
    assert 1 < job.batches <= 4 and job.rows_in == 25
    assert TaskLog.objects.filter(task=task, event="batch_size_raised").exists()
    task.refresh_from_db()
    reference = data.run_single(PIPELINE, data.frame_from_records(people))
    assert task.result["rows"] == data.to_records(reference.frame)


class Killed(BaseException):
    """The worker process dying (SIGKILL, OOM): nothing in the process runs after it."""


def _files_under(root: Path, task: Task) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and str(task.id) in str(path)]


def test_a_task_whose_worker_dies_while_staging_leaves_no_files_after_the_sweep(
    api, chord, monkeypatch, artifact_root
):
    # given a worker that dies after writing three of five batches
    written = artifacts.write

    def write_then_die(name, fill):
        if len(_files_under(artifact_root, task)) == 3:
            raise Killed
        return written(name, fill)

    task = _created(api, {"records": PEOPLE, "operations": [], "batch_size": 5})
    monkeypatch.setattr(artifacts, "write", write_then_die)
    with pytest.raises(Killed):
        _run(task)
    monkeypatch.setattr(artifacts, "write", written)
    assert len(_files_under(artifact_root, task)) == 3

    # when the task ends FAILED and beat's sweep runs after the grace
    Task.objects.filter(pk=task.pk).update(
        status=TaskStatus.FAILED, finished_at=timezone.now() - timedelta(hours=2)
    )
    artifacts.expire()

    # then none of its staged files is left
    assert _files_under(artifact_root, task) == []
    assert not DataJob.objects.filter(task=task).exists()


def test_a_retry_after_a_worker_died_while_staging_stages_again(
    api, chord, monkeypatch, artifact_root, django_capture_on_commit_callbacks
):
    written = artifacts.write
    calls = []

    def write_then_die(name, fill):
        calls.append(name)
        if len(calls) == 2:
            raise Killed
        return written(name, fill)

    task = _created(api, {"records": PEOPLE, "operations": PIPELINE, "batch_size": 10})
    monkeypatch.setattr(artifacts, "write", write_then_die)
    with pytest.raises(Killed):
        _run(task)
    monkeypatch.setattr(artifacts, "write", written)
    Task.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert recovery.expire_leases() == 1
    Task.objects.filter(pk=task.pk).update(next_attempt_at=timezone.now())

    assert _run(task).status == "deferred"
    assert DataJob.objects.get(task=task).batches == 3
    for index in chord.sent[0]:
        batches.batch_run(str(task.id), index)
    with django_capture_on_commit_callbacks(execute=True):
        assert batches.merge_run(str(task.id), task.attempt) == "completed"
    task.refresh_from_db()
    reference = data.run_single(PIPELINE, data.frame_from_records(PEOPLE))
    assert task.result["rows"] == data.to_records(reference.frame)
    assert _files_under(artifact_root, task) == []  # the dead attempt's files too


def test_a_task_that_fails_while_staging_removes_its_files_at_once(
    api, chord, monkeypatch, artifact_root
):
    written = artifacts.write

    def write_or_fail(name, fill):
        if len(_files_under(artifact_root, task)) == 2:
            raise OSError("disk full")
        return written(name, fill)

    task = _created(api, {"records": PEOPLE, "operations": [], "batch_size": 5})
    monkeypatch.setattr(artifacts, "write", write_or_fail)
    assert _run(task).status == "failed"
    assert "disk full" in task.error
    assert _files_under(artifact_root, task) == []


def _stored(user: Any, size: int) -> Artifact:
    return Artifact.objects.create(
        owner=user,
        name=f"results/x/{size}.jsonl",
        format="jsonl",
        content_type="application/x-ndjson",
        size_bytes=size,
        expires_at=timezone.now() + timedelta(days=1),
    )


def test_an_artifact_past_the_owners_quota_fails_the_task_and_leaves_nothing(
    api, user, settings, artifact_root
):
    # given an owner with 900 of 1,000 bytes used (and another owner far over)
    settings.QW_ARTIFACT_QUOTA_BYTES = 1000
    _stored(user, 900)
    _stored(UserFactory(), 10**9)
    task = _created(api, {"records": PEOPLE, "operations": [], "output": "artifact"})

    # when its output is stored, then the task fails for good and stores nothing
    assert _run(task).status == "failed"
    assert task.failure_class == "non_retryable"
    assert task.error == "artifact quota of 1000 bytes exceeded for this owner"
    assert not Artifact.objects.filter(task=task).exists()
    assert _files_under(artifact_root, task) == []

    # and the same output is stored with no quota (0)
    settings.QW_ARTIFACT_QUOTA_BYTES = 0
    again = _created(api, {"records": PEOPLE, "operations": [], "output": "artifact"})
    assert _run(again).status == "completed"
    assert Artifact.objects.filter(task=again).exists()


def test_staged_batches_count_against_the_owners_quota(api, user, chord, settings, artifact_root):
    settings.QW_ARTIFACT_QUOTA_BYTES = 4000
    _stored(user, 3000)
    task = _created(api, {"records": PEOPLE, "operations": [], "batch_size": 5})
    assert _run(task).status == "failed"
    assert task.error == "artifact quota of 4000 bytes exceeded for this owner"
    assert task.failure_class == "non_retryable"
    assert _files_under(artifact_root, task) == []
    assert chord.sent == []


def test_a_second_output_past_the_quota_takes_the_first_with_it(
    api, user, client_for, settings, artifact_root
):
    # given the sizes of a task's rows and invalid-rows artifacts (measured for another owner)
    schema = {"properties": {"id": {"maximum": 4}}}
    payload = {
        "records": PEOPLE,
        "operations": [{"op": "validate", "schema": schema, "on_invalid": "collect"}],
        "output": "artifact",
    }
    settings.QW_DATA_INLINE_MAX_BYTES = 1024
    measured = _created(client_for(UserFactory()), payload)
    _run(measured)
    rows_size = Artifact.objects.get(task=measured, name__contains="/rows-").size_bytes
    invalid_size = Artifact.objects.get(task=measured, name__contains="/invalid-").size_bytes
    assert rows_size > 0 and invalid_size > 0

    # when the owner has room for the first but not both
    settings.QW_ARTIFACT_QUOTA_BYTES = rows_size + invalid_size - 1
    task = _created(api, payload)

    # then the task fails and neither is left
    assert _run(task).status == "failed"
    assert "artifact quota" in task.error
    assert not Artifact.objects.filter(task=task).exists()
    assert _files_under(artifact_root, task) == []


# --- CSV staged as byte ranges -----------------------------------------------------------------

QUOTED_CSV = (
    "id,email,note\n"
    + "".join(
        f'{i}," User{i % 4}@Example.com ","line {i}\nsecond, ""line"""\n'
        + ("\n" if i % 5 == 0 else "")  # blank lines are no rows
        for i in range(23)
    )
    + "23,bad,last"  # no newline at the end
)
RANGE_PIPELINE = [
    {
        "op": "validate",
        "schema": {"properties": {"email": {"pattern": "@"}}},
        "on_invalid": "collect",
    },
    {"op": "clean", "trim": True, "lower": ["email"]},
    {"op": "dedupe", "keys": ["email"], "keep": "last"},
    {"op": "sort", "by": [{"field": "id", "desc": True}]},
]


def _run_batched(task: Task, chord: Chord, capture: Any) -> Task:
    assert _run(task).status == "deferred"
    return _run_batched_rest(task, chord, capture)


def test_a_csv_source_is_staged_as_byte_ranges_with_the_result_of_serial_staging(
    api, chord, server, monkeypatch, artifact_root, django_capture_on_commit_callbacks
):
    # given a CSV whose quoted fields hold newlines, quotes and commas, in batches of 4 rows
    server.script("/people.csv", Reply(body=QUOTED_CSV, headers={"Content-Type": "text/csv"}))
    payload = {"source": server.url("/people.csv"), "operations": RANGE_PIPELINE, "batch_size": 4}
    task = _created(api, payload)

    # when it is staged
    assert _run(task).status == "deferred"

    # then its batches are byte ranges of one stored copy of the file, 4 rows each
    rows = list(DataBatch.objects.filter(job__task=task).order_by("index"))
    assert [(b.first_row, b.rows) for b in rows] == [(i * 4, min(4, 24 - i * 4)) for i in range(6)]
    assert all(batches.RANGE_MARK in batch.source for batch in rows)
    assert {batch.source.partition(batches.RANGE_MARK)[0] for batch in rows} == {
        f"work/{task.id}/a1/in/source.csv"
    }
    stored = [p.name for p in _files_under(artifact_root, task)]
    assert stored == ["source.csv"]

    # and, batched and merged, its result is that of serial staging (Arrow batches)
    task = _run_batched_rest(task, chord, django_capture_on_commit_callbacks)
    monkeypatch.setattr(batches, "_csv_ranges", lambda *args: None)
    serial = _run_batched(_created(api, payload), chord, django_capture_on_commit_callbacks)
    assert not any(
        batches.RANGE_MARK in source
        for source in DataBatch.objects.filter(job__task=serial).values_list("source", flat=True)
    )
    assert task.result == serial.result
    assert task.result["stats"]["rows_in"] == 24 and task.result["stats"]["batches"] == 6
    assert task.result["invalid_rows"][0]["row"] == 23
    assert task.result["rows"][0]["note"] == 'line 22\nsecond, "line"'
    assert _files_under(artifact_root, task) == []  # the copy goes with the task's work


def test_a_csv_artifact_is_read_in_place_by_its_batches(
    api, chord, artifact_root, django_capture_on_commit_callbacks
):
    # given a CSV artifact (another task's output)
    people = [{"id": r["id"], "email": r["email"].strip(), "country": r["country"]} for r in PEOPLE]
    first = _created(
        api, {"records": people, "operations": [], "output": "artifact", "output_format": "csv"}
    )
    _run(first)
    artifact = Artifact.objects.get(task=first)

    # when a task reads it in batches of 10
    task = _created(
        api, {"source": {"artifact": str(artifact.id)}, "operations": PIPELINE, "batch_size": 10}
    )
    assert _run(task).status == "deferred"

    # then the batches are ranges of the artifact's own file: nothing is copied
    sources_ = set(DataBatch.objects.filter(job__task=task).values_list("source", flat=True))
    assert {source.partition(batches.RANGE_MARK)[0] for source in sources_} == {artifact.name}
    assert _files_under(artifact_root, task) == []
    task = _run_batched_rest(task, chord, django_capture_on_commit_callbacks)
    reference = data.run_single(PIPELINE, data.frame_from_records(_as_text(people)))
    assert task.result["rows"] == data.to_records(reference.frame)
    assert artifact.name in [str(p.relative_to(artifact_root)) for p in artifact_root.rglob("*")]


def _run_batched_rest(task: Task, chord: Chord, capture: Any) -> Task:
    for index in chord.sent[-1]:
        assert batches.batch_run(str(task.id), index) == "done"
    with capture(execute=True):
        assert batches.merge_run(str(task.id), task.attempt) == "completed"
    task.refresh_from_db()
    return task


def _as_text(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{key: str(value) for key, value in row.items()} for row in rows]


def test_a_downloaded_csv_past_the_owners_quota_fails_and_leaves_nothing(
    api, user, chord, server, settings, artifact_root
):
    settings.QW_ARTIFACT_QUOTA_BYTES = 4000
    _stored(user, 3000)
    server.script("/big.csv", Reply(body="a,b\n" + "1,2\n" * 400))
    task = _created(api, {"source": server.url("/big.csv"), "operations": [], "batch_size": 50})
    assert _run(task).status == "failed"
    assert task.error == "artifact quota of 4000 bytes exceeded for this owner"
    assert _files_under(artifact_root, task) == []
    assert chord.sent == []


def test_a_named_file_on_the_local_artifacts_disk_is_stored_as_a_link_not_a_copy(
    artifact_root, tmp_path
):
    # given a named file beside the local artifacts folder (a downloaded CSV source)
    with open(tmp_path / "download.csv", "w+b") as file:
        file.write(b"a,b\n1,2\n")

        # when it is saved in the storage
        name, size = artifacts.save("work/t/a1/in/source.csv", file)

        # then the stored file is the same file, not a copy, with the same bytes
        assert (name, size) == ("work/t/a1/in/source.csv", 8)
        assert os.path.samefile(artifact_root / name, tmp_path / "download.csv")
    with artifacts.reading(name) as stored:
        assert stored.read() == b"a,b\n1,2\n"


def test_a_file_that_cannot_be_linked_is_copied(artifact_root, tmp_path, monkeypatch):
    # given a named file that cannot be linked (another disk, say)
    def other_disk(source: str, target: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", other_disk)
    with open(tmp_path / "download.csv", "w+b") as file:
        file.write(b"a,b\n1,2\n")

        # when it is saved in the storage
        name, _ = artifacts.save("work/t/a1/in/source.csv", file)

        # then the storage holds a copy of its bytes
        assert not os.path.samefile(artifact_root / name, tmp_path / "download.csv")
    assert (artifact_root / name).read_bytes() == b"a,b\n1,2\n"


def test_a_csv_with_a_quote_left_open_is_staged_in_order_and_fails_as_before(api, chord, server):
    server.script("/open.csv", Reply(body='a,b\n1,"open\n' + "2,3\n" * 10))
    task = _created(api, {"source": server.url("/open.csv"), "operations": [], "batch_size": 2})
    assert _run(task).status == "failed"
    assert task.failure_class == "non_retryable"
    assert "CSV" in task.error
    assert not DataBatch.objects.filter(job__task=task).exists()


def test_a_range_that_does_not_hold_the_rows_counted_at_staging_fails_its_batch(api, chord, server):
    server.script("/people.csv", Reply(body=QUOTED_CSV, headers={"Content-Type": "text/csv"}))
    task = _created(api, {"source": server.url("/people.csv"), "operations": [], "batch_size": 4})
    assert _run(task).status == "deferred"
    DataBatch.objects.filter(job__task=task, index=1).update(rows=5)
    assert batches.batch_run(str(task.id), 1) == "failed"
    error = DataBatch.objects.get(job__task=task, index=1).error
    assert error == "source: the batch's bytes hold 4 rows, 5 when it was staged"
