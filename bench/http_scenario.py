"""HTTP_REQUEST end to end, beside a plain ``requests.Session`` loop making the same calls.

``python -m bench.http_scenario [--tasks N] [--method GET|POST] [--pool P] [--concurrency C]``

1. Isolation as ``make bench`` does it (``bench.services``): the run's own vhost and database,
   gunicorn, one worker on every queue, started as the deployment starts the http.request group
   (``-P prefork -c 2``, each child running a message's requests ``QW_HTTP_CONCURRENCY`` at a
   time; ``--pool threads --concurrency 32`` is the former setup), with
   ``QW_HTTP_ALLOWED_HOSTS`` naming a
   loopback server that answers at once (the standard library's ``ThreadingHTTPServer``,
   HTTP/1.1 keep-alive, in its own process, counting the TCP connections it accepts).
2. ``N`` HTTP_REQUEST tasks are created through the bulk endpoint while the worker drains
   them: tasks/s from the first create to the last COMPLETED (the worker's ``finished_at``).
3. The service is stopped; one process makes the same ``N`` calls in a loop over one
   ``requests.Session``: calls/s, and the ratio of the two.

Connections accepted by the server show whether the worker reused them: a new connection per
task would count ``N``; reuse counts one per thread that ran HTTP tasks (``QW_HTTP_CONCURRENCY``
per prefork child, or per ``-P threads`` thread).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import requests

from bench import services
from bench.scenarios import TASK_TABLE, Api
from bench.services import BenchError, Isolation, Processes

# As compose.yaml and deploy/base/worker-http.yaml start the http.request group.
POOL = "prefork"
CONCURRENCY = 2
POOLS = ("threads", "prefork", "solo")
WEB_WORKERS = 2
BATCH = 1000
TARGET = 800.0  # HTTP tasks/s end to end
RATIO_TARGET = 0.6  # HTTP_REQUEST end to end / the plain Session loop, same run
PATH = "/bench"
RESULT_FILE = "http_latest.json"

COUNT_SQL = f"""
SELECT count(*) FILTER (WHERE status = 'COMPLETED'),
       count(*) FILTER (WHERE status IN ('FAILED', 'CANCELLED')),
       count(*)
FROM {TASK_TABLE} WHERE type = %s
"""
LATENCY_SQL = f"""
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
       extract(epoch FROM max(finished_at))
FROM {TASK_TABLE} WHERE status = 'COMPLETED' AND type = %s
"""


@dataclass
class Drain:
    """One batch of tasks created in bulk while the worker drains them."""

    type: str
    tasks: int
    accepted: int = 0
    submit_s: float = 0.0
    completed: int = 0
    failed: int = 0
    e2e_s: float | None = None
    e2e_throughput: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None


@dataclass
class HttpResult:
    tasks: int
    method: str
    pool: str = POOL
    concurrency: int = CONCURRENCY
    http: Drain | None = None
    noop: Drain | None = None  # the same pipeline with the NOOP handler, for comparison
    service_requests: int = 0
    service_connections: int = 0
    plain_s: float | None = None
    plain_throughput: float | None = None
    plain_connections: int = 0
    ratio: float | None = None
    complete: bool = False
    errors: list[str] = field(default_factory=list)


# --- the loopback server, in its own process ---------------------------------------------------


def _serve(conn: multiprocessing.connection.Connection) -> None:
    from tasks_app.http.testing import LoopbackServer, Reply

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    with LoopbackServer() as server:
        server.script(PATH, Reply(json={"ok": True}))
        conn.send(server.port)
        while True:
            command = conn.recv()
            if command == "stats":
                conn.send((server.connections, len(server.requests)))
            elif command == "stop":
                return


class ServerProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child,), daemon=True)
        self._process.start()
        if not self._conn.poll(30):
            raise BenchError("the loopback HTTP server did not start")
        self.port: int = self._conn.recv()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def stats(self) -> tuple[int, int]:
        """(connections accepted, requests served) so far."""
        self._conn.send("stats")
        connections, served = self._conn.recv()
        return int(connections), int(served)

    def stop(self) -> None:
        if self._process.is_alive():
            self._conn.send("stop")
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


def start_worker(
    processes: Processes,
    broker_url: str,
    queues: list[str],
    run_id: str,
    pool: str,
    concurrency: int,
) -> Any:
    """``bench.services.start_worker`` with the pool named: every work queue, one process."""
    argv = [
        services.executable("celery"),
        "-A",
        "queueworker",
        "worker",
        "-c",
        str(concurrency),
        "-P",
        pool,
        "-n",
        f"qw_bench_{run_id}@%h",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
    ]
    child = processes.start("worker", argv, services.WORKER_ENV)
    services.wait_until(
        lambda: services.queues_consumed(broker_url, queues),
        timeout=90,
        what=f"the worker to consume {', '.join(queues)}",
        interval=0.3,
        check=child.check_alive,
    )
    return child


# --- the measurements --------------------------------------------------------------------------


def _drain(
    api: Api,
    database_url: str,
    task: dict[str, Any],
    n: int,
    *,
    timeout: float,
    check: Any,
    log: Any,
) -> Drain:
    """Create ``n`` copies of ``task`` in bulk calls while the worker drains them."""
    drain = Drain(type=task["type"], tasks=n)
    sizes = [min(BATCH, n - offset) for offset in range(0, n, BATCH)]
    started = time.time()
    for size in sizes:
        response = api.post("/api/tasks/bulk/", json.dumps({"tasks": [task] * size}).encode())
        if response.status_code != 201:
            raise BenchError(f"bulk create: HTTP {response.status_code} {response.text[:300]}")
        drain.accepted += len(response.json()["ids"])
    drain.submit_s = time.time() - started
    log(f"  submitted {drain.accepted:,} in {drain.submit_s:.2f} s; waiting for the worker")
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            check()
            row = conn.execute(COUNT_SQL, [drain.type]).fetchone()
            assert row is not None
            drain.completed, drain.failed, total = (int(v) for v in row)
            if drain.completed + drain.failed >= total >= drain.accepted:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{drain.type}: timeout after {timeout:.0f} s")
            time.sleep(0.2)
        if drain.failed:
            error = conn.execute(
                f"SELECT error FROM {TASK_TABLE} WHERE status = 'FAILED' LIMIT 1"
            ).fetchone()
            raise BenchError(f"{drain.failed} FAILED, e.g.: {error[0] if error else '?'}")
        row = conn.execute(LATENCY_SQL, [drain.type]).fetchone()
    assert row is not None
    count, p50, p99, last_finished = row
    if count:
        drain.e2e_s = float(last_finished) - started
        drain.e2e_throughput = int(count) / drain.e2e_s
        drain.latency_p50_ms = float(p50) * 1000
        drain.latency_p99_ms = float(p99) * 1000
    return drain


def _plain_loop(url: str, n: int, method: str) -> tuple[float, list[float]]:
    """The yardstick: the same calls, one after another, over one keep-alive Session."""
    session = requests.Session()
    session.trust_env = False
    body = {"n": 1} if method == "POST" else None
    timings: list[float] = []
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        response = session.request(method, url, json=body, timeout=30)
        response.raise_for_status()
        response.json()
        timings.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    session.close()
    return elapsed, timings


def run_http_scenario(
    n: int = 5000,
    *,
    method: str = "GET",
    timeout: float | None = None,
    noop_baseline: bool = True,
    pool: str = POOL,
    concurrency: int = CONCURRENCY,
    keep: bool = False,
    log: Any = print,
) -> HttpResult:
    """Measure HTTP_REQUEST tasks end to end and the plain loop; see the module docstring."""
    result = HttpResult(tasks=n, method=method, pool=pool, concurrency=concurrency)
    timeout = timeout if timeout is not None else max(120.0, n / 20)
    iso = Isolation()
    server = ServerProcess()
    processes = Processes(
        env={**iso.env, "QW_HTTP_ALLOWED_HOSTS": f"127.0.0.1:{server.port}"},
        log_dir=iso.log_dir,
    )
    log(f"http bench {iso.run_id}: vhost and database {iso.name}, logs in {iso.log_dir}")
    try:
        mode = iso.setup(processes)
        web_port = services.free_port()
        services.start_web(processes, web_port, workers=WEB_WORKERS)
        start_worker(processes, iso.broker_url, mode["work_queues"], iso.run_id, pool, concurrency)
        api = Api(f"http://127.0.0.1:{web_port}", mode["token"])
        payload: dict[str, Any] = {"url": server.url, "method": method}
        if method == "POST":
            payload["json"] = {"n": 1}
        log(f"HTTP_REQUEST end to end: {n:,} {method} tasks against {server.url}")
        before = server.stats()
        common = {"timeout": timeout, "check": processes.check_alive, "log": log}
        task = {"type": "HTTP_REQUEST", "payload": payload}
        result.http = _drain(api, iso.database_url, task, n, **common)
        after = server.stats()
        result.service_connections = after[0] - before[0]
        result.service_requests = after[1] - before[1]
        if noop_baseline:
            log(f"NOOP end to end on the same worker: {n:,} tasks")
            result.noop = _drain(api, iso.database_url, {"type": "NOOP"}, n, **common)
        processes.stop_all()  # the yardstick gets the machine to itself

        log(f"plain requests.Session loop: {n:,} {method} calls")
        before = server.stats()
        elapsed, _ = _plain_loop(server.url, n, method)
        result.plain_connections = server.stats()[0] - before[0]
        result.plain_s = elapsed
        result.plain_throughput = n / elapsed
        if result.http.e2e_throughput:
            result.ratio = result.http.e2e_throughput / result.plain_throughput
        result.complete = result.http.completed == n and result.service_requests == n
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        processes.stop_all()
        server.stop()
        iso.finish(keep=keep, succeeded=result.complete, log=log)
    return result


def render(result: HttpResult) -> str:
    def fmt(value: float | None, unit: str = "", spec: str = ",.0f") -> str:
        return "—" if value is None else f"{value:{spec}}{unit}"

    http, noop = result.http, result.noop
    rate = http.e2e_throughput if http else None
    met = result.complete and (rate or 0) >= TARGET
    ratio_met = result.complete and (result.ratio or 0) >= RATIO_TARGET
    rows = [
        ("HTTP_REQUEST tasks, end to end", f"{fmt(rate)} tasks/s"),
        ("  target", f">= {TARGET:,.0f} tasks/s: {'MET' if met else 'MISSED'}"),
        (
            "  target, ratio to the plain loop",
            f">= {RATIO_TARGET}x: {'MET' if ratio_met else 'MISSED'}",
        ),
        (
            "  creation rate (bulk endpoint)",
            f"{fmt(http.accepted / http.submit_s if http and http.submit_s else None)} tasks/s",
        ),
        (
            "  create→COMPLETED p50 / p99",
            f"{fmt(http.latency_p50_ms if http else None, ' ms')} / "
            f"{fmt(http.latency_p99_ms if http else None, ' ms')}",
        ),
        (
            "  requests served / connections accepted",
            f"{result.service_requests:,} / {result.service_connections:,}",
        ),
        (
            "NOOP tasks, same run and worker",
            f"{fmt(noop.e2e_throughput if noop else None)} tasks/s",
        ),
        ("plain requests.Session loop, one process", f"{fmt(result.plain_throughput)} calls/s"),
        ("  connections accepted", f"{result.plain_connections:,}"),
        ("HTTP_REQUEST / plain loop", fmt(result.ratio, "x", ".2f")),
    ]
    width = max(len(name) for name, _ in rows)
    title = f"HTTP bench: {result.tasks:,} {result.method} tasks"
    lines = [f"{title}, worker -P {result.pool} -c {result.concurrency}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += [f"  error: {error}" for error in result.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_scenario", description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--method", choices=["GET", "POST"], default="GET")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--no-noop", action="store_true", help="skip the NOOP comparison")
    parser.add_argument("--pool", choices=POOLS, default=POOL, help="the worker's pool")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="the pool's processes or threads"
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = run_http_scenario(
            args.tasks,
            method=args.method,
            timeout=args.timeout,
            noop_baseline=not args.no_noop,
            pool=args.pool,
            concurrency=args.concurrency,
            keep=args.keep,
        )
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    except Exception:
        print(traceback.format_exc(), flush=True)
        return 1
    print("\n" + render(result), flush=True)
    path = services.ROOT / "bench" / "results" / RESULT_FILE
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        json.dumps({**asdict(result), "finished_at": datetime.now(UTC).isoformat()}, indent=2)
    )
    print(f"results: {path}", flush=True)
    return 0 if result.complete else 2


if __name__ == "__main__":
    sys.exit(main())
