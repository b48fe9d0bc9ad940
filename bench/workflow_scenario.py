"""Workflow runs end to end: runs/s and the step-to-step latency of a linear workflow.

``python -m bench.workflow_scenario [--runs N] [--rate R] [--timeout S] [--keep] [--profile DIR]``

1. Isolation as ``make bench`` does it (``bench.services``): the run's own vhost and
   database, gunicorn (two workers) and one Celery worker (prefork, concurrency 2).
2. A 5-step linear NOOP workflow is created through the API; ``N`` runs are started one
   after another with ``POST /api/workflows/{id}/runs/`` over one ``requests.Session``
   while the worker drains them (``--rate R``: at most R runs/s, to measure the latency
   below saturation); the database is polled until every run has finished.
3. Figures, from the database's timestamps (one machine, one clock):

   - runs/s end to end: completed runs / (last run's ``finished_at`` − first POST);
   - step-to-step latency, for each consecutive pair of steps of a run: the next step's
     ``started_at`` − the previous step's ``finished_at``, split into *decide* (the next
     task's ``created_at`` − ``finished_at``: the coordinator, in the completing
     transaction) and *pick-up* (``started_at`` − ``created_at``: commit, publish, broker,
     claim), all in one SQL query joining ``tasks_app_task`` by run and step pair.

``--profile DIR`` records py-spy (``.venv/bin/py-spy``, as root or with ptrace allowed) on
the worker and on gunicorn while the runs are submitted and drained: collapsed stacks in
``DIR/worker.txt`` and ``DIR/web.txt``, whose hottest frames are printed.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import requests
from psycopg import sql

from bench import services
from bench.scenarios import percentile
from bench.services import BenchError, Child, Isolation, Processes

CONCURRENCY = 2
WEB_WORKERS = 2
STEPS = 5
POLL_S = 0.25
STALL_S = 60.0
RESULT_FILE = "workflow_latest.json"

# Targets from the workflows issue.
GAP_P50_TARGET_MS = 20.0
GAP_P99_TARGET_MS = 100.0
RUNS_TARGET = 100.0  # runs/s end to end

STEP_NAMES = [f"s{i}" for i in range(1, STEPS + 1)]
DEFINITION: dict[str, Any] = {
    "start": STEP_NAMES[0],
    "steps": {
        name: {"type": "NOOP", **({"next": nxt} if nxt else {})}
        for name, nxt in zip(STEP_NAMES, [*STEP_NAMES[1:], None], strict=True)
    },
}

RUN_COUNT_SQL = """
SELECT count(*) FILTER (WHERE status = 'COMPLETED'),
       count(*) FILTER (WHERE status IN ('FAILED', 'COMPENSATED', 'CANCELLED')),
       count(*),
       extract(epoch FROM max(finished_at)),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))
FROM workflows_app_workflowrun
WHERE workflow_id = %s
"""

# Every consecutive pair of steps of every run of the workflow, in one query.
GAP_SQL = sql.SQL("""
WITH pair (prev_step, next_step) AS (VALUES {pairs}),
gap AS (
    SELECT extract(epoch FROM nxt.started_at - prv.finished_at) AS total,
           extract(epoch FROM nxt.created_at - prv.finished_at) AS decide,
           extract(epoch FROM nxt.started_at - nxt.created_at) AS pickup
    FROM tasks_app_task AS prv
    JOIN pair ON pair.prev_step = prv.step
    JOIN tasks_app_task AS nxt
      ON nxt.workflow_run_id = prv.workflow_run_id AND nxt.step = pair.next_step
    JOIN workflows_app_workflowrun AS run ON run.id = prv.workflow_run_id
    WHERE run.workflow_id = %s
      AND prv.type <> 'COMPENSATION' AND nxt.type <> 'COMPENSATION'
      AND prv.status = 'COMPLETED' AND nxt.started_at IS NOT NULL
)
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY total),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY total),
       max(total),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY decide),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY decide),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY pickup),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY pickup)
FROM gap
""").format(
    pairs=sql.SQL(", ").join(
        sql.SQL("({}, {})").format(sql.Literal(a), sql.Literal(b)) for a, b in pairwise(STEP_NAMES)
    )
)


@dataclass
class WorkflowResult:
    runs: int
    rate: float = 0.0  # runs/s the submission was paced at; 0: as fast as one session goes
    steps: int = STEPS
    accepted: int = 0
    submit_s: float = 0.0
    submit_rate: float = 0.0
    post_p50_ms: float | None = None
    post_p99_ms: float | None = None
    completed: int = 0
    other_finished: int = 0
    unfinished: int = 0
    e2e_s: float | None = None
    runs_per_s: float | None = None
    run_p50_ms: float | None = None
    run_p99_ms: float | None = None
    gaps: int = 0
    gap_p50_ms: float | None = None
    gap_p99_ms: float | None = None
    gap_max_ms: float | None = None
    decide_p50_ms: float | None = None
    decide_p99_ms: float | None = None
    pickup_p50_ms: float | None = None
    pickup_p99_ms: float | None = None
    complete: bool = False
    profiles: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _ms(value: Any) -> float | None:
    return None if value is None else float(value) * 1000


class Profiler:
    """py-spy on a child's process tree until stopped (SIGINT makes it write its file)."""

    def __init__(self, child: Child, out: Path) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [
                    services.executable("py-spy"),
                    "record",
                    "--pid",
                    str(child.pid),
                    "--subprocesses",
                    "--nonblocking",
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


PROJECT_DIRS = ("queueworker/", "tasks_app/", "workflows_app/")


def hottest(collapsed: Path, top: int = 15) -> list[tuple[str, float]]:
    """The project's functions by share of samples with them on the stack, from py-spy's
    raw (collapsed) output: ``func (path)``, line numbers merged."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        seen = set()
        for frame in stack.split(";"):
            func, _, where = frame.partition(" (")
            if where.startswith(PROJECT_DIRS):
                key = f"{func} ({where.rsplit(':', 1)[0]})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += count
    if not total:
        return []
    return [(frame, 100 * count / total) for frame, count in inclusive.most_common(top)]


def run_workflow_scenario(
    n: int = 300,
    *,
    rate: float = 0.0,
    timeout: float | None = None,
    keep: bool = False,
    profile_dir: Path | None = None,
    log: Any = print,
) -> WorkflowResult:
    result = WorkflowResult(runs=n, rate=rate)
    timeout = timeout if timeout is not None else max(120.0, n / 5)
    iso = Isolation()
    processes = Processes(env=iso.env, log_dir=iso.log_dir)
    profilers: list[Profiler] = []
    log(f"workflow bench {iso.run_id}: vhost and database {iso.name}, logs in {iso.log_dir}")
    try:
        mode = iso.setup(processes)
        port = services.free_port()
        web = services.start_web(processes, port, workers=WEB_WORKERS)
        worker = services.start_worker(
            processes, iso.broker_url, mode["work_queues"], iso.run_id, concurrency=CONCURRENCY
        )
        base = f"http://127.0.0.1:{port}"
        session = requests.Session()
        session.trust_env = False
        session.headers.update({"Authorization": f"Token {mode['token']}"})
        created = session.post(
            f"{base}/api/workflows/",
            json={"name": f"bench-linear-{iso.run_id}", "definition": DEFINITION},
            timeout=30,
        )
        if created.status_code != 201:
            raise BenchError(f"create workflow: HTTP {created.status_code} {created.text[:300]}")
        workflow_id = created.json()["id"]
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            profilers = [
                Profiler(worker, profile_dir / "worker.txt"),
                Profiler(web, profile_dir / "web.txt"),
            ]
            time.sleep(1.0)  # py-spy attaches
        pace = f", at most {rate:g} runs/s" if rate else ""
        log(f"{n:,} runs of a {STEPS}-step linear NOOP workflow, one POST each{pace}")
        timings: list[float] = []
        url = f"{base}/api/workflows/{workflow_id}/runs/"
        started = time.time()
        for i in range(n):
            if rate:
                time.sleep(max(0.0, started + i / rate - time.time()))
            t0 = time.perf_counter()
            try:
                response = session.post(url, json={"input": {"i": i}}, timeout=60)
            except requests.RequestException as exc:
                result.errors.append(f"run {i + 1}: {type(exc).__name__}: {exc}")
                continue
            timings.append(time.perf_counter() - t0)
            if response.status_code != 201:
                if len(result.errors) < 10:
                    result.errors.append(
                        f"run {i + 1}: HTTP {response.status_code} {response.text[:200]}"
                    )
                continue
            result.accepted += 1
        result.submit_s = time.time() - started
        result.submit_rate = result.accepted / result.submit_s if result.submit_s else 0.0
        if timings:
            result.post_p50_ms = percentile(timings, 0.5) * 1000
            result.post_p99_ms = percentile(timings, 0.99) * 1000
        log(
            f"  started {result.accepted:,} runs in {result.submit_s:.2f} s "
            f"({result.submit_rate:,.0f} runs/s); waiting for them to finish"
        )
        _wait(iso.database_url, workflow_id, result, timeout, processes.check_alive, log)
        for profiler in profilers:
            profiler.stop()
        _measure(iso.database_url, workflow_id, result, started)
        result.complete = (
            result.accepted == n and result.completed == n and result.gaps == n * (STEPS - 1)
        )
        for profiler in profilers:
            if profiler.out.exists():
                result.profiles[profiler.out.stem] = str(profiler.out)
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        for profiler in profilers:
            profiler.stop()
        processes.stop_all()
        iso.finish(keep=keep, succeeded=result.complete, log=log)
    return result


def _wait(
    database_url: str,
    workflow_id: str,
    result: WorkflowResult,
    timeout: float,
    check: Any,
    log: Any,
) -> None:
    deadline = time.monotonic() + timeout
    last_done, last_progress, last_report = -1, time.monotonic(), time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            check()
            row = conn.execute(RUN_COUNT_SQL, (workflow_id,)).fetchone()
            assert row is not None
            result.completed, result.other_finished, total = (int(v) for v in row[:3])
            done = result.completed + result.other_finished
            result.unfinished = total - done
            if done >= result.accepted:
                return
            now = time.monotonic()
            if done != last_done:
                last_done, last_progress = done, now
            if now - last_report >= 5:
                log(f"  … {result.completed:,} runs completed, {result.unfinished:,} unfinished")
                last_report = now
            if now > deadline:
                result.errors.append(f"timeout: {result.unfinished:,} runs unfinished")
                return
            if now - last_progress > STALL_S:
                result.errors.append(f"stalled: no run finished for {STALL_S:.0f} s")
                return
            time.sleep(POLL_S)


def _measure(database_url: str, workflow_id: str, result: WorkflowResult, started: float) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        runs = conn.execute(RUN_COUNT_SQL, (workflow_id,)).fetchone()
        gaps = conn.execute(GAP_SQL, (workflow_id,)).fetchone()
        if result.other_finished:
            error = conn.execute(
                "SELECT status, error FROM workflows_app_workflowrun "
                "WHERE workflow_id = %s AND status <> 'COMPLETED' LIMIT 1",
                (workflow_id,),
            ).fetchone()
            result.errors.append(f"{result.other_finished} runs did not complete, e.g. {error}")
    assert runs is not None and gaps is not None
    last_finished = runs[3]
    if result.completed and last_finished is not None:
        result.e2e_s = float(last_finished) - started
        result.runs_per_s = result.completed / result.e2e_s
        result.run_p50_ms, result.run_p99_ms = _ms(runs[4]), _ms(runs[5])
    result.gaps = int(gaps[0])
    (
        result.gap_p50_ms,
        result.gap_p99_ms,
        result.gap_max_ms,
        result.decide_p50_ms,
        result.decide_p99_ms,
        result.pickup_p50_ms,
        result.pickup_p99_ms,
    ) = (_ms(v) for v in gaps[1:])


def targets(result: WorkflowResult) -> list[tuple[str, str, float | None, str]]:
    def judge(value: float | None, ok: bool) -> str:
        return "n/a" if value is None else ("MET" if ok and result.complete else "MISSED")

    p50, p99, rate = result.gap_p50_ms, result.gap_p99_ms, result.runs_per_s
    return [
        (
            "step-to-step p50",
            f"< {GAP_P50_TARGET_MS:.0f} ms",
            p50,
            judge(p50, p50 is not None and p50 < GAP_P50_TARGET_MS),
        ),
        (
            "step-to-step p99",
            f"< {GAP_P99_TARGET_MS:.0f} ms",
            p99,
            judge(p99, p99 is not None and p99 < GAP_P99_TARGET_MS),
        ),
        (
            "runs end to end",
            f">= {RUNS_TARGET:.0f} runs/s",
            rate,
            judge(rate, rate is not None and rate >= RUNS_TARGET),
        ),
    ]


def render(result: WorkflowResult) -> str:
    def fmt(value: float | None, unit: str = "", spec: str = ",.1f") -> str:
        return "—" if value is None else f"{value:{spec}}{unit}"

    def pair(a: float | None, b: float | None) -> str:
        return f"{fmt(a, ' ms')} / {fmt(b, ' ms')}"

    rows = [
        ("runs started (one POST each)", f"{result.accepted:,} of {result.runs:,}"),
        ("  submission", f"{fmt(result.submit_rate, ' runs/s')} over {result.submit_s:.2f} s"),
        ("  POST p50 / p99", pair(result.post_p50_ms, result.post_p99_ms)),
        ("runs completed", f"{result.completed:,} ({result.unfinished:,} unfinished)"),
        ("runs end to end", f"{fmt(result.runs_per_s, ' runs/s')} over {fmt(result.e2e_s, ' s')}"),
        ("  run created→finished p50 / p99", pair(result.run_p50_ms, result.run_p99_ms)),
        (
            f"step-to-step ({result.gaps:,} pairs) p50 / p99",
            pair(result.gap_p50_ms, result.gap_p99_ms),
        ),
        ("  max", fmt(result.gap_max_ms, " ms")),
        (
            "  decide: finished→next created p50 / p99",
            pair(result.decide_p50_ms, result.decide_p99_ms),
        ),
        ("  pick-up: created→started p50 / p99", pair(result.pickup_p50_ms, result.pickup_p99_ms)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"Workflow bench: {result.runs:,} runs × {result.steps} NOOP steps"
        f"{f' paced at {result.rate:g} runs/s' if result.rate else ''}, "
        f"gunicorn {WEB_WORKERS} workers, worker concurrency {CONCURRENCY}"
    ]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append("  targets:")
    for name, target, value, status in targets(result):
        unit = " runs/s" if "runs" in name else " ms"
        lines.append(f"    {name:<18} {target:<14} {fmt(value, unit):>14}  {status}")
    for name, path in result.profiles.items():
        lines.append(f"  py-spy {name}: {path} (% of samples with the function on the stack)")
        for frame, share in hottest(Path(path)):
            lines.append(f"    {share:5.1f} %  {frame}")
    lines += [f"  error: {error}" for error in result.errors]
    return "\n".join(lines)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workflow_scenario",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=300, help="runs to start (default 300)")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="pace the POSTs at R runs/s (default 0: as fast as one session goes)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait (default max(120, N/5))"
    )
    parser.add_argument("--keep", action="store_true", help="keep database, vhost and logs")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="record py-spy on the worker and gunicorn into DIR",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.rate < 0:
        parser.error("--rate must not be negative")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = run_workflow_scenario(
            args.runs,
            rate=args.rate,
            timeout=args.timeout,
            keep=args.keep,
            profile_dir=args.profile,
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
