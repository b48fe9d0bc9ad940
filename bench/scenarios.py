"""The measurements: bulk end to end, single create latency (idle and with the worker
saturated), bare Celery.

Times are wall-clock epoch seconds (``time.time()``) on both sides: the benchmark's clock for
the start of submission, the worker's ``finished_at`` (same machine, same clock) for the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench import bare_app
from bench.services import Processes, executable, niced, queues_consumed, wait_until
from queueworker import messaging

POLL_S = 0.5
STALL_S = 60.0
TASK_TABLE = "tasks_app_task"

COUNT_SQL = f"""
SELECT count(*) FILTER (WHERE status = 'COMPLETED'),
       count(*) FILTER (WHERE status = 'FAILED'),
       count(*) FILTER (WHERE status = 'CANCELLED'),
       count(*)
FROM {TASK_TABLE}
"""

# One query over every completed task: create→COMPLETED latency and the last completion time.
LATENCY_SQL = f"""
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
       max(extract(epoch FROM finished_at - created_at)),
       extract(epoch FROM max(finished_at))
FROM {TASK_TABLE}
WHERE status = 'COMPLETED'
"""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (what PostgreSQL's percentile_cont does)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Api:
    """The REST API over one keep-alive ``requests.Session`` with the bench user's token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers.update(
            {"Authorization": f"Token {token}", "Content-Type": "application/json"}
        )

    def post(self, path: str, body: bytes, timeout: float = 120.0) -> requests.Response:
        return self.session.post(f"{self.base_url}{path}", data=body, timeout=timeout)


# --- bulk end to end ---------------------------------------------------------------------------


@dataclass
class BulkResult:
    requested: int
    batch: int
    calls: int = 0
    failed_calls: int = 0
    accepted: int = 0
    submit_s: float = 0.0
    creation_rate: float = 0.0
    call_p50_ms: float | None = None
    call_max_ms: float | None = None
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    complete: bool = False
    e2e_s: float | None = None
    e2e_throughput: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    errors: list[str] = field(default_factory=list)


def run_bulk(
    api: Api,
    database_url: str,
    n: int,
    *,
    batch: int = 1000,
    timeout: float,
    check: Callable[[], None],
    log: Callable[[str], None] = print,
) -> BulkResult:
    """Submit ``n`` NOOP tasks in bulk calls while the (already running) worker drains them."""
    result = BulkResult(requested=n, batch=batch)
    sizes = [min(batch, n - offset) for offset in range(0, n, batch)]
    bodies = {size: json.dumps({"tasks": [{"type": "NOOP"}] * size}).encode() for size in sizes}
    call_ms: list[float] = []
    started = time.time()
    for size in sizes:
        result.calls += 1
        t0 = time.perf_counter()
        try:
            response = api.post("/api/tasks/bulk/", bodies[size])
        except requests.RequestException as exc:
            result.failed_calls += 1
            result.errors.append(f"bulk call {result.calls}: {type(exc).__name__}: {exc}")
            continue
        call_ms.append((time.perf_counter() - t0) * 1000)
        if response.status_code != 201:
            result.failed_calls += 1
            result.errors.append(
                f"bulk call {result.calls}: HTTP {response.status_code} {response.text[:300]}"
            )
            continue
        result.accepted += len(response.json()["ids"])
    submitted = time.time()
    result.submit_s = submitted - started
    result.creation_rate = result.accepted / result.submit_s if result.submit_s > 0 else 0.0
    if call_ms:
        result.call_p50_ms = percentile(call_ms, 0.5)
        result.call_max_ms = max(call_ms)
    log(
        f"  submitted {result.accepted:,} of {n:,} in {result.calls} calls, "
        f"{result.submit_s:.2f} s ({result.creation_rate:,.0f} tasks/s); waiting for the worker"
    )

    deadline = time.monotonic() + timeout
    last_progress, last_done, last_report = time.monotonic(), -1, time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            check()
            row = conn.execute(COUNT_SQL).fetchone()
            assert row is not None
            result.completed, result.failed, result.cancelled, total = (int(v) for v in row)
            done = result.completed + result.failed + result.cancelled
            result.unfinished = total - done
            if total >= result.accepted and result.unfinished == 0:
                break
            now = time.monotonic()
            if done != last_done:
                last_done, last_progress = done, now
            if now - last_report >= 5:
                log(f"  … {result.completed:,} completed, {result.unfinished:,} unfinished")
                last_report = now
            if now > deadline:
                result.errors.append(
                    f"timeout: {result.unfinished:,} tasks unfinished after {timeout:.0f} s"
                )
                break
            if now - last_progress > STALL_S:
                result.errors.append(
                    f"stalled: no task finished for {STALL_S:.0f} s, "
                    f"{result.unfinished:,} unfinished"
                )
                break
            time.sleep(POLL_S)
        row = conn.execute(LATENCY_SQL).fetchone()
    assert row is not None
    count, p50, p99, worst, last_finished = row
    result.complete = result.accepted == n and result.completed == n and result.failed_calls == 0
    if result.failed or result.cancelled:
        result.errors.append(f"{result.failed} FAILED, {result.cancelled} CANCELLED tasks")
    if count:  # percentile_cont and max are NULL only over no rows
        result.latency_p50_ms = float(p50) * 1000
        result.latency_p99_ms = float(p99) * 1000
        result.latency_max_ms = float(worst) * 1000
        result.e2e_s = float(last_finished) - started
        result.e2e_throughput = int(count) / result.e2e_s
    return result


# --- single create latency ---------------------------------------------------------------------


@dataclass
class SingleResult:
    requests: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    completed_after: int | None = None  # of the created tasks, completed within the wait
    unfinished_at_end: int | None = None  # tasks not yet finished when the last create returned


def run_single(
    api: Api,
    database_url: str,
    count: int = 500,
    *,
    check: Callable[[], None],
    wait_s: float = 60.0,
    between: Callable[[psycopg.Connection[Any], int], None] | None = None,
) -> SingleResult:
    """``count`` sequential creates of one NOOP each, worker running; client-side latency.
    ``between`` runs before each create, outside the timed span."""
    result = SingleResult(requests=count)
    body = json.dumps({"type": "NOOP"}).encode()
    latencies: list[float] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = _completed(conn)
        for i in range(count):
            if between is not None:
                between(conn, i)
            t0 = time.perf_counter()
            try:
                response = api.post("/api/tasks/", body, timeout=30)
            except requests.RequestException as exc:
                result.errors.append(f"request {i + 1}: {type(exc).__name__}: {exc}")
                continue
            elapsed_ms = (time.perf_counter() - t0) * 1000
            if response.status_code != 201:
                if len(result.errors) < 20:
                    result.errors.append(
                        f"request {i + 1}: HTTP {response.status_code} {response.text[:200]}"
                    )
                continue
            latencies.append(elapsed_ms)
        result.unfinished_at_end = _unfinished(conn)
        result.ok = len(latencies)
        if latencies:
            result.p50_ms = percentile(latencies, 0.5)
            result.p99_ms = percentile(latencies, 0.99)
            result.mean_ms = sum(latencies) / len(latencies)
            result.max_ms = max(latencies)
        # Not part of the latency figure: check that what was accepted also ran.
        try:
            wait_until(
                lambda: _completed(conn) - before >= result.ok,
                timeout=wait_s,
                what="the single-create tasks to complete",
                interval=POLL_S,
                check=check,
            )
        except Exception as exc:
            result.errors.append(str(exc))
        result.completed_after = _completed(conn) - before
    return result


def run_single_saturated(
    api: Api,
    database_url: str,
    backlog: int,
    count: int = 500,
    *,
    batch: int = 1000,
    timeout: float,
    check: Callable[[], None],
    log: Callable[[str], None] = print,
) -> SingleResult:
    """Single-create latency while the worker is saturated: ``backlog`` NOOP tasks are created
    in bulk first and topped up between creates (bulk calls, not timed) whenever fewer than
    half are left, so the worker drains all along; ``count`` sequential creates are timed with
    the same client and percentile code as ``run_single``. ``unfinished_at_end`` tells
    whether the backlog lasted through the measurement."""
    body = json.dumps({"tasks": [{"type": "NOOP"}] * batch}).encode()
    floor = max(batch, backlog // 2)

    def top_up(conn: psycopg.Connection[Any]) -> None:
        left = _unfinished(conn)
        while left < backlog:
            response = api.post("/api/tasks/bulk/", body)
            if response.status_code != 201:
                raise RuntimeError(f"backlog bulk call: HTTP {response.status_code}")
            left += batch

    def between(conn: psycopg.Connection[Any], i: int) -> None:
        if i % 10 == 0 and _unfinished(conn) < floor:
            top_up(conn)

    with psycopg.connect(database_url, autocommit=True) as conn:
        top_up(conn)
    result = run_single(api, database_url, count, check=check, wait_s=timeout, between=between)
    log(
        f"  {result.ok} creates, p50 {result.p50_ms or 0:.1f} ms, p99 {result.p99_ms or 0:.1f} ms"
        f"; backlog left when the last create returned: {result.unfinished_at_end or 0:,}"
    )
    return result


def _unfinished(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM {TASK_TABLE} WHERE status IN ('PENDING', 'RETRYING', 'PROCESSING')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def _completed(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(f"SELECT count(*) FROM {TASK_TABLE} WHERE status = 'COMPLETED'").fetchone()
    assert row is not None
    return int(row[0])


# --- bare Celery -------------------------------------------------------------------------------

BARE_COMPLETION_METHOD = (
    "per-pool-process completion counters written by the task itself "
    "(exact time of the last completion; polled every 0.1 s)"
)


@dataclass
class BareResult:
    requested: int
    published: int = 0
    publish_s: float = 0.0
    publish_rate: float = 0.0
    completed: int = 0
    complete: bool = False
    e2e_s: float | None = None
    e2e_throughput: float | None = None
    completion_method: str = BARE_COMPLETION_METHOD
    errors: list[str] = field(default_factory=list)


def run_bare(
    processes: Processes,
    broker_url: str,
    n: int,
    *,
    timeout: float,
    concurrency: int = 2,
    log: Callable[[str], None] = print,
) -> BareResult:
    """Publish ``n`` no-ops with ``apply_async`` from one producer while the bare worker drains."""
    result = BareResult(requested=n)
    counter_dir = processes.log_dir / "bare-counters"
    counter_dir.mkdir(exist_ok=True)
    # Celery reads CELERY_BROKER_URL from the environment before its own configuration.
    os.environ["CELERY_BROKER_URL"] = broker_url
    os.environ[bare_app.BROKER_ENV] = broker_url
    bare_app.app.conf.update(broker_url=broker_url)
    argv = [
        *niced(),
        executable("celery"),
        "-A",
        "bench.bare_app",
        "worker",
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "-Q",
        bare_app.QUEUE,
        "-n",
        f"bench_bare_{os.getpid()}@%h",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
    ]
    child = processes.start(
        "bare-worker",
        argv,
        extra_env={bare_app.BROKER_ENV: broker_url, bare_app.COUNTER_DIR_ENV: str(counter_dir)},
    )
    try:
        wait_until(
            lambda: queues_consumed(broker_url, [bare_app.QUEUE]),
            timeout=60,
            what=f"the bare worker to consume {bare_app.QUEUE}",
            interval=0.3,
            check=child.check_alive,
        )
        with bare_app.app.connection_for_write() as conn:
            vhost = messaging.broker_vhost(broker_url)
            if conn.virtual_host != vhost:
                raise RuntimeError(f"bare app would publish to {conn.as_uri()}, not {vhost}")
        started = time.time()
        with bare_app.app.producer_or_acquire() as producer:
            for _ in range(n):
                bare_app.noop.apply_async(producer=producer)
                result.published += 1
        result.publish_s = time.time() - started
        result.publish_rate = result.published / result.publish_s if result.publish_s else 0.0
        log(
            f"  published {result.published:,} in {result.publish_s:.2f} s "
            f"({result.publish_rate:,.0f} tasks/s); waiting for the bare worker"
        )
        _wait_bare(result, counter_dir, started, timeout, child.check_alive)
    finally:
        processes.stop(child)
    return result


def _wait_bare(
    result: BareResult,
    counter_dir: Path,
    started: float,
    timeout: float,
    check: Callable[[], None],
) -> None:
    deadline = time.monotonic() + timeout
    last_progress, last_done = time.monotonic(), -1
    latest: float | None = None
    while True:
        check()
        result.completed, latest = bare_app.read_counters(counter_dir)
        if result.completed >= result.published:
            break
        now = time.monotonic()
        if result.completed != last_done:
            last_done, last_progress = result.completed, now
        if now > deadline:
            result.errors.append(f"timeout after {timeout:.0f} s")
            break
        if now - last_progress > STALL_S:
            result.errors.append(f"stalled: no completion for {STALL_S:.0f} s")
            break
        time.sleep(0.1)
    result.complete = result.completed == result.requested == result.published
    if result.completed > result.published:
        result.errors.append(f"{result.completed} completions for {result.published} messages")
    if latest is not None and result.completed:
        result.e2e_s = latest - started
        result.e2e_throughput = result.completed / result.e2e_s
