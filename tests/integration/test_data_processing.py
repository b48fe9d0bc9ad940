"""DATA_PROCESSING on real workers: a million-row CSV from a loopback server, a SIGKILL
mid-chord, a source URL that resolves inside the network, a gzip bomb, and a batch size of
one row over a large source."""

from __future__ import annotations

import functools
import signal
import threading
import zlib
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from tasks_app.http.testing import LoopbackServer, Reply
from tasks_app.models import BatchStatus, DataBatch, Task, TaskLog, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TERMINAL = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def files(tmp_path: Path, settings) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on loopback; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    netloc = f"127.0.0.1:{server.server_address[1]}"
    settings.QW_HTTP_ALLOWED_HOSTS = [netloc]
    yield folder, f"http://{netloc}"
    server.shutdown()
    server.server_close()


def _people(rows: int, path: Path) -> pl.DataFrame:
    """``rows`` people with duplicate emails, blanks and stray spaces, written as CSV."""
    ids = pl.int_range(0, rows, eager=True)
    countries = pl.Series(["DE", "FR", "IT", "ES", "PL", ""])
    frame = pl.DataFrame({"id": ids}).with_columns(
        email=pl.format(" User{}@Example.com", pl.col("id") % (rows // 3 + 1)),
        country=countries.gather(ids % 6),
        amount=((pl.col("id") * 37) % 1000).cast(pl.Float64) / 10,
    )
    frame.write_csv(path)
    return frame


PIPELINE = [
    {
        "op": "validate",
        "schema": {"type": "object", "required": ["id", "email", "amount"]},
        "on_invalid": "drop",
    },
    {
        "op": "clean",
        "trim": True,
        "lower": ["email"],
        "empty_as_null": True,
        "drop_null": ["country"],
    },
    {"op": "cast", "fields": {"amount": "float", "id": "int"}},
    {"op": "dedupe", "keys": ["email"], "keep": "first"},
    {
        "op": "aggregate",
        "group_by": ["country"],
        "metrics": {"people": {"count": "*"}, "total": {"sum": "amount"}},
    },
]


def _expected(frame: pl.DataFrame) -> dict[str, tuple[int, float]]:
    """The same pipeline in plain Polars, written independently of the engine."""
    cleaned = (
        frame.with_columns(pl.col("email").str.strip_chars().str.to_lowercase())
        .filter(pl.col("country") != "")
        .unique(subset=["email"], keep="first", maintain_order=True)
    )
    grouped = cleaned.group_by("country").agg(pl.len().alias("n"), pl.col("amount").sum())
    return {row[0]: (row[1], round(row[2], 6)) for row in grouped.iter_rows()}


def _by_country(result: dict) -> dict[str, tuple[int, float]]:
    return {r["country"]: (r["people"], round(r["total"], 6)) for r in result["rows"]}


def _create(api, payload: dict, **extra) -> str:
    response = api.post(
        "/api/tasks/", {"type": "DATA_PROCESSING", "payload": payload, **extra}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _finished(task_id: str, timeout: float) -> Task:
    wait_for(lambda: Task.objects.get(pk=task_id).status in TERMINAL, timeout=timeout, interval=0.2)
    return Task.objects.get(pk=task_id)


def test_a_million_row_csv_from_a_url_completes_in_parallel_batches(
    api, spawn, files, artifact_root
):
    folder, base = files
    frame = _people(1_000_000, folder / "people.csv")
    spawn(
        "worker",
        QW_HTTP_ALLOWED_HOSTS=base.removeprefix("http://"),
        QW_ARTIFACT_ROOT=str(artifact_root),
    )

    task_id = _create(
        api,
        {"source": f"{base}/people.csv", "operations": PIPELINE, "batch_size": 250_000},
        timeout_s=300,
    )
    task = _finished(task_id, timeout=240)

    assert task.status == TaskStatus.COMPLETED, task.error
    stats = task.result["stats"]
    assert (stats["rows_in"], stats["batches"]) == (1_000_000, 4)
    assert _by_country(task.result) == _expected(frame)


def test_a_worker_killed_mid_chord_still_completes_with_the_right_result(
    api, spawn, files, artifact_root
):
    # given a 20-batch task on a single-process worker
    folder, base = files
    frame = _people(200_000, folder / "people.csv")
    env = {
        "QW_HTTP_ALLOWED_HOSTS": base.removeprefix("http://"),
        "QW_ARTIFACT_ROOT": str(artifact_root),
    }
    worker = spawn("worker", concurrency=1, **env)
    task_id = _create(
        api,
        {"source": f"{base}/people.csv", "operations": PIPELINE, "batch_size": 10_000},
        timeout_s=300,
    )

    # when the whole worker is SIGKILLed once the first batch is done
    wait_for(
        lambda: DataBatch.objects.filter(job_id=task_id, status=BatchStatus.DONE).exists(),
        timeout=120,
        interval=0.02,
    )
    worker.kill(signal.SIGKILL)
    done_at_kill = DataBatch.objects.filter(job_id=task_id, status=BatchStatus.DONE).count()
    assert Task.objects.get(pk=task_id).status == TaskStatus.PROCESSING
    assert done_at_kill < 20
    spawn("worker", **env)

    # then the redelivered batches and the merge finish it, with the single-run result
    task = _finished(task_id, timeout=180)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result["stats"]["batches"] == 20
    assert _by_country(task.result) == _expected(frame)


def test_a_source_url_that_resolves_inside_the_network_is_refused_at_fetch(
    api, spawn, files, artifact_root
):
    folder, base = files
    _people(10, folder / "people.csv")
    port = base.rsplit(":", 1)[1]
    spawn("worker", QW_ARTIFACT_ROOT=str(artifact_root))  # no allow-list in the worker

    task_id = _create(api, {"source": f"http://localhost:{port}/people.csv", "operations": []})
    task = _finished(task_id, timeout=60)

    assert task.status == TaskStatus.FAILED
    assert task.failure_class == "non_retryable"
    # the refusal names the host the user wrote, never the internal address it resolved to
    assert "source.url" in task.error and "localhost" in task.error
    assert "private or reserved" in task.error and "127.0.0.1" not in task.error


def test_a_gzip_bomb_from_a_url_fails_for_good_and_leaves_no_files(
    api, spawn, settings, artifact_root
):
    # given a 150 KB gzip body that decodes to 150 MiB of CSV
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(b"0\n" * (1 << 19)) for _ in range(150)]
    body = b"".join([*parts, compressor.flush()])
    with LoopbackServer() as server:
        server.script(
            "/bomb.csv",
            Reply(headers={"Content-Encoding": "gzip", "Content-Type": "text/csv"}, body=body),
        )
        spawn("worker", QW_HTTP_ALLOWED_HOSTS=server.netloc, QW_ARTIFACT_ROOT=str(artifact_root))
        settings.QW_HTTP_ALLOWED_HOSTS = [server.netloc]
        task_id = _create(api, {"source": server.url("/bomb.csv"), "operations": []})

        # when a worker fetches it, then the task fails at once and nothing stays on disk
        task = _finished(task_id, timeout=60)
    assert task.status == TaskStatus.FAILED
    assert task.failure_class == "non_retryable"
    assert "QW_DATA_MAX_COMPRESSION_RATIO" in task.error
    assert not [path for path in artifact_root.rglob("*") if path.is_file()]


def test_batch_size_one_over_a_large_source_runs_in_at_most_the_batch_cap(
    api, spawn, files, artifact_root
):
    # given 30,000 rows asked in batches of 1, on workers that allow 10 batches
    folder, base = files
    frame = _people(30_000, folder / "people.csv")
    spawn(
        "worker",
        QW_HTTP_ALLOWED_HOSTS=base.removeprefix("http://"),
        QW_ARTIFACT_ROOT=str(artifact_root),
        QW_DATA_MAX_BATCHES="10",
    )

    # when it runs
    task_id = _create(
        api,
        {"source": f"{base}/people.csv", "operations": PIPELINE, "batch_size": 1},
        timeout_s=120,
    )
    task = _finished(task_id, timeout=120)

    # then it completes in at most 10 batches with the result of any batching
    assert task.status == TaskStatus.COMPLETED, task.error
    assert 1 < task.result["stats"]["batches"] <= 10
    assert _by_country(task.result) == _expected(frame)
    assert TaskLog.objects.filter(task_id=task_id, event="batch_size_raised").exists()
