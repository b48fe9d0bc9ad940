"""The soak: sustained submission through a real gunicorn for ``QW_SOAK_SECONDS`` (default 600)
at ``QW_SOAK_RATE`` tasks a second (default 200), with one worker SIGKILLed half way.

The mix: HTTP_REQUEST tasks against a loopback server (bulk and single creates, the single
ones with an ``Idempotency-Key``), data work (``workload.data_task``: DATA_PROCESSING when it
is registered, one pipeline in five in two batches, its stand-in otherwise) and runs of a
four-step saga whose steps call the loopback server. It reports throughput, create→COMPLETED
latency p50/p99 per window of time, worker RSS growth and API latency, and checks the
invariants once everything drained, and every pipeline's output against its input.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import requests
from django.db import connection

from tasks_app.http.testing import LoopbackServer, Received, Reply
from tasks_app.models import Task, TaskLog, TaskStatus, WorkerHeartbeat
from tests.chaos import harness, invariants, report, workload

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SECONDS = int(os.environ.get("QW_SOAK_SECONDS", "600"))
RATE = int(os.environ.get("QW_SOAK_RATE", "200"))
WINDOWS = 10
STEPS_PER_RUN = 4
# Shares of the tasks created per second: HTTP tasks (bulk and single), data, workflow steps.
SHARES = {"http": 0.35, "single": 0.05, "data": 0.30, "workflow": 0.30}
DRAIN_S = max(300, SECONDS)
# Below this share of RATE the soak did not apply its load (the API could not take it): a
# failure, not a figure. The share reached is reported either way.
MIN_RATE_SHARE = 0.5
# The soak runs at the shipped defaults (leases, sweep, dispatch, backoff): tuned values would
# hide what overload does to recovery.
SOAK_ENV: dict[str, str] = {}


@dataclass
class Submitter:
    """``per_s`` calls a second for the soak's duration, paced, over ``lanes`` threads (a
    slow answer delays only its own lane), each with its own HTTP session."""

    name: str
    per_s: float
    call: Callable[[requests.Session, int], list[str]]
    session: Callable[[], requests.Session]
    lanes: int = 1
    ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def threads(self, started: float, stop: threading.Event) -> list[threading.Thread]:
        return [
            threading.Thread(target=self._lane, args=(lane, started, stop), daemon=True)
            for lane in range(self.lanes)
        ]

    def _lane(self, lane: int, started: float, stop: threading.Event) -> None:
        session = self.session()
        n = lane
        while not stop.is_set():
            due = started + n / self.per_s
            if due >= started + SECONDS:
                return
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            began = time.monotonic()
            ids: list[str] = []
            error = None
            try:
                ids = self.call(session, n)
            except (requests.RequestException, AssertionError, KeyError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            with self._lock:
                self.ids += ids
                self.latencies.append(time.monotonic() - began)
                if error:
                    self.errors.append(error)
            n += self.lanes

    def stats(self) -> dict[str, float]:
        ms = [t * 1000 for t in self.latencies]
        return {
            "calls": len(ms),
            "p50_ms": round(statistics.median(ms), 1) if ms else 0.0,
            "p99_ms": round(_percentile(ms, 0.99), 1),
        }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _wrong_data_outputs(inputs: dict[str, int]) -> list[str]:
    """DATA_PROCESSING tasks whose output is not what their records give."""
    if not workload.data_processing_available():
        return []
    wrong = []
    done = Task.objects.filter(type="DATA_PROCESSING", status=TaskStatus.COMPLETED)
    for task_id, result in done.values_list("pk", "result").iterator():
        rows = (result or {}).get("rows", [])
        got = {(r["country"], r["people"], r["total"]) for r in rows}
        n = inputs.get(str(task_id))  # None: its bulk call failed client-side (an API error)
        if n is not None and got != workload.data_expected(n, 40):
            wrong.append(str(task_id))
    return wrong


def _windows(width_s: float) -> list[dict]:
    """Per window of creation time: tasks created, completions per second (by finish time),
    create→COMPLETED p50/p99."""
    table = connection.ops.quote_name(Task._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH t0 AS (SELECT min(created_at) AS t0 FROM {table}),
            timed AS (
                SELECT *, extract(epoch FROM finished_at - created_at) AS took FROM {table}),
            created AS (
                SELECT floor(extract(epoch FROM created_at - t0) / %s)::int AS w, count(*) AS n,
                       percentile_cont(0.5) WITHIN GROUP (ORDER BY took)
                           FILTER (WHERE status = %s) AS p50,
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY took)
                           FILTER (WHERE status = %s) AS p99
                FROM timed, t0 GROUP BY 1),
            done AS (
                SELECT floor(extract(epoch FROM finished_at - t0) / %s)::int AS w, count(*) AS n
                FROM {table}, t0 WHERE status = %s GROUP BY 1)
            SELECT coalesce(c.w, d.w), coalesce(c.n, 0), coalesce(d.n, 0), c.p50, c.p99
            FROM created c FULL JOIN done d ON c.w = d.w ORDER BY 1
            """,  # a quoted table name; values are parameters
            [width_s, TaskStatus.COMPLETED, TaskStatus.COMPLETED, width_s, TaskStatus.COMPLETED],
        )
        rows = cursor.fetchall()
    return [
        {
            "window": f"{w * width_s:g}–{(w + 1) * width_s:g} s",
            "created": int(created),
            "completed_per_s": round(done / width_s, 1),
            "p50_s": round(p50, 3) if p50 is not None else None,
            "p99_s": round(p99, 3) if p99 is not None else None,
        }
        for w, created, done, p50, p99 in rows
    ]


@pytest.mark.timeout(SECONDS + DRAIN_S + 300)
def test_soak_sustained_load_with_a_worker_killed(services, spawn, token, settings):
    loopback = LoopbackServer().start()
    settings.QW_HTTP_ALLOWED_HOSTS = [loopback.netloc]
    env = {**SOAK_ENV, "QW_HTTP_ALLOWED_HOSTS": loopback.netloc}
    try:
        _soak(services, spawn, token, loopback, env)
    finally:
        loopback.stop()


class Calls:
    """The loopback server's answer on every path the soak calls; counts each call's
    ``Idempotency-Key`` (a task's calls share one) instead of keeping every request."""

    def __init__(self, loopback: LoopbackServer) -> None:
        self.keys: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loopback = loopback
        for path in workload.PATHS:
            loopback.script(path, self._answer)

    def _answer(self, received: Received) -> Reply:
        with self._lock:
            self.keys[received.header("Idempotency-Key") or ""] += 1
        return Reply(json={"ok": True})

    def forget_requests(self) -> None:
        self._loopback.requests.clear()  # counted above; ten minutes of them would pile up

    def repeated(self) -> int:
        with self._lock:
            return sum(1 for n in self.keys.values() if n > 1)


def _db_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


@dataclass
class Expiries:
    """Lease expiries (``lease_expired`` log rows), each attributed to the process that held
    the task: before the kill there must be none; after it, only the killed worker's."""

    before_kill: int = 0
    killed_worker: int = 0  # held by a process of the worker that was SIGKILLed
    live_holder: int = 0  # held by a process that was alive: a busy worker judged dead
    no_holder: int = 0  # held by no process (a data task waiting for its batches)

    @property
    def not_killed(self) -> int:
        return self.live_holder + self.no_holder


def _holders_of(proc: harness.Proc) -> set[str]:
    """The heartbeat ids of a started worker's processes (the worker and its pool)."""
    pids = [proc.popen.pid, *proc.children()]
    return {
        str(i) for i in WorkerHeartbeat.objects.filter(pid__in=pids).values_list("id", flat=True)
    }


def _expiries(kill_at, killed: set[str]) -> Expiries:
    found = Expiries()
    for created_at, data in TaskLog.objects.filter(event="lease_expired").values_list(
        "created_at", "data"
    ):
        holder = (data or {}).get("holder")
        if created_at < kill_at:
            found.before_kill += 1
        elif holder in killed:
            found.killed_worker += 1
        elif holder:
            found.live_holder += 1
        else:
            found.no_holder += 1
    return found


def _soak(services, spawn, token, loopback: LoopbackServer, env: dict[str, str]) -> None:
    # given gunicorn, two workers and beat, a workflow, and the loopback HTTP server
    web = services.web(token=token, **env)
    workers = [spawn("worker", **env), spawn("worker", **env)]
    spawn("beat", **env)
    base = loopback.url("").rstrip("/")
    setup = web.session()
    response = setup.post(
        f"{web.base}/api/workflows/",
        json={"name": "soak-saga", "definition": workload.order_saga(base)},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    workflow = response.json()["id"]
    calls = Calls(loopback)

    batch = 25  # tasks per bulk call (HTTP and data work together)
    bulk_per_s = RATE * (SHARES["http"] + SHARES["data"]) / batch
    http_in_batch = round(batch * SHARES["http"] / (SHARES["http"] + SHARES["data"]))

    data_inputs: dict[str, int] = {}  # data task id -> the n its records were made from

    def bulk(session: requests.Session, n: int) -> list[str]:
        bodies = [workload.http_task(base, n * batch + i) for i in range(http_in_batch)]
        data_ns = [n * batch + i for i in range(http_in_batch, batch)]
        # one pipeline in five runs in two batches (a chord and a merge), the rest inline
        bodies += [workload.data_task(m, batch_size=20 if m % 5 == 0 else None) for m in data_ns]
        r = session.post(f"{web.base}/api/tasks/bulk/", json={"tasks": bodies}, timeout=30)
        assert r.status_code == 201, r.text[:300]
        ids = r.json()["ids"]
        data_inputs.update(zip(ids[http_in_batch:], data_ns, strict=True))
        return ids

    def single(session: requests.Session, n: int) -> list[str]:
        r = session.post(
            f"{web.base}/api/tasks/",
            json=workload.http_task(base, 10_000_000 + n),
            headers={"Idempotency-Key": f"soak-{n}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text[:300]
        return [r.json()["id"]]

    def run(session: requests.Session, n: int) -> list[str]:
        r = session.post(f"{web.base}/api/workflows/{workflow}/runs/", json={}, timeout=30)
        assert r.status_code == 201, r.text[:300]
        return [r.json()["id"]]

    submitters = [
        Submitter("bulk", bulk_per_s, bulk, web.session, lanes=3),
        Submitter("single", RATE * SHARES["single"], single, web.session, lanes=2),
        Submitter("run", RATE * SHARES["workflow"] / STEPS_PER_RUN, run, web.session, lanes=2),
    ]
    rss: list[tuple[float, int, int]] = []  # (seconds in, KiB of the worker not killed, web)
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.wait(5.0):
            calls.forget_requests()
            rss.append(
                (
                    time.monotonic() - started,
                    harness.group_rss_kib(workers[0]),
                    harness.group_rss_kib(web.proc),
                )
            )

    threads = [thread for s in submitters for thread in s.threads(started, stop)]
    threads.append(threading.Thread(target=sample, daemon=True))
    for thread in threads:
        thread.start()

    # when, half way through, the second worker is SIGKILLed and started again
    try:
        time.sleep(SECONDS / 2)
        kill_at = round(time.monotonic() - started, 1)
        kill_db_time = _db_now()
        killed_holders = _holders_of(workers[1])
        workers[1].kill(signal.SIGKILL)
        workers[1] = spawn("worker", **env)
        for thread in threads[:-1]:
            thread.join(timeout=SECONDS + 120)
        submitted_s = time.monotonic() - started
    finally:
        stop.set()  # the submitters and the sampler stop, also when the test fails
    threads[-1].join(timeout=30)

    # then everything drains, and the invariants hold
    accepted = [i for s in submitters if s.name != "run" for i in s.ids]
    submitter_runs = submitters[2].ids
    found = invariants.settle_and_check(DRAIN_S, accepted=accepted)
    windows = _windows(max(1.0, SECONDS / WINDOWS))
    table = connection.ops.quote_name(Task._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM {table}"
        )
        span = float(cursor.fetchone()[0] or 0)
    warm = [r for r in rss if r[0] >= SECONDS * 0.1] or rss
    rss_start, rss_end = (warm[0][1], warm[-1][1]) if warm else (0, 0)
    errors = [e for s in submitters for e in s.errors]
    submitted_rate = round((len(accepted) + len(submitter_runs) * STEPS_PER_RUN) / submitted_s, 1)
    problems = []
    if submitted_rate < MIN_RATE_SHARE * RATE:
        problems.append(f"submitted {submitted_rate} tasks/s, under {MIN_RATE_SHARE:.0%} of {RATE}")
    if errors:
        problems.append(f"{len(errors)} API calls failed: {errors[:5]}")
    if found.by_status != {TaskStatus.COMPLETED: found.tasks}:
        problems.append(f"not all completed: {found.by_status}")
    if found.runs_by_status != {"COMPLETED": len(submitter_runs)}:
        problems.append(f"runs: {found.runs_by_status}")
    # a lease expires only for work the killed worker held: never while every worker is alive
    expired = _expiries(kill_db_time, killed_holders)
    if expired.before_kill:
        problems.append(f"{expired.before_kill} leases expired before any worker was killed")
    if expired.not_killed:
        problems.append(
            f"{expired.not_killed} leases expired that the killed worker did not hold "
            f"({expired.live_holder} of live processes, {expired.no_holder} of no process)"
        )
    wrong_data = _wrong_data_outputs(data_inputs)
    if wrong_data:
        problems.append(f"{len(wrong_data)} data pipelines with a wrong output: {wrong_data[:5]}")
    report.SOAK.update(
        seconds=SECONDS,
        target_rate=RATE,
        mix=f"HTTP {SHARES['http'] + SHARES['single']:.0%} ({SHARES['single']:.0%} single "
        f"creates), data {SHARES['data']:.0%} ({workload.DATA_WORK}), workflow steps "
        f"{SHARES['workflow']:.0%}",
        kill_at_s=kill_at,
        tasks=found.tasks,
        runs=found.runs,
        submitted_rate=submitted_rate,
        api_calls=sum(len(s.latencies) for s in submitters),
        api_errors=len(errors),
        api=[{"call": s.name, **s.stats()} for s in submitters],
        throughput=round(found.completed / span, 1) if span else None,
        drain_s=found.settle_s,
        rss_start_mib=round(rss_start / 1024, 1),
        rss_end_mib=round(rss_end / 1024, 1),
        rss_growth_pct=round(100 * (rss_end - rss_start) / rss_start, 1) if rss_start else 0.0,
        web_rss_mib=round(rss[-1][2] / 1024, 1) if rss else None,
        completed=found.completed,
        failed=found.failed,
        duplicates_executed=found.duplicates_executed,
        duplicates_completed=len(found.duplicates_completed),
        lost=len(found.lost) + len(found.missing),
        stuck=len(found.stuck),
        joins_twice=len(found.joins_twice),
        leases_expired_before_kill=expired.before_kill,
        leases_expired_killed_worker=expired.killed_worker,
        leases_expired_live_holder=expired.live_holder,
        leases_expired_no_holder=expired.no_holder,
        http_calls=sum(calls.keys.values()),
        http_repeated=calls.repeated(),
        windows=windows,
        rss_samples=[(round(t), kib, web_kib) for t, kib, web_kib in rss],
        passed=not (found.violations or problems),
        violations=[*found.violations, *problems],
    )
    found.assert_ok()
    assert not problems, problems
