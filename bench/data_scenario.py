"""DATA_PROCESSING end to end on a million-row CSV, beside a standalone pandas script.

``python -m bench.data_scenario [--rows N] [--batch-size B] [--modes one,parallel,single]
[--repeat R] [--seed S] [--timeout S] [--keep] [--profile DIR]``

What is measured, and how:

1. A CSV of ``N`` people (default 1,000,000 rows, about 104 MB; columns id, email, name,
   country, city, amount, age, joined, note) is generated with numpy and Polars (vectorised,
   seeded: the same bytes every run, in about a second) in a temporary folder. Emails repeat
   (about half the rows are duplicates) with stray spaces and mixed case; some countries, ages
   and notes are empty, some countries padded with spaces; about 1 % of amounts and 0.3 % of
   emails do not match the schema; notes hold commas and quotes.
2. The folder is served on loopback by the standard library's ``ThreadingHTTPServer`` (a
   thread of this process); ``QW_HTTP_ALLOWED_HOSTS`` names it for gunicorn and the workers
   (the URL is checked at create and again at fetch), ``QW_ARTIFACT_ROOT`` is in the run's log
   folder.
3. The pandas reference (``bench/pandas_reference.py``) runs first, as its own process (so
   that its RSS is its own): seconds from ``read_csv`` to the grouped frame, its peak RSS
   (``VmHWM``), its row counts and groups, which are the expected result. It runs again right
   before each task of each mode (below): the machine is shared and its load drifts, so each
   ratio compares runs made side by side.
4. Isolation as ``make bench`` does it (``bench.services``): the run's own vhost and database,
   gunicorn (two workers, warmed up by a few refused creates), and for each mode a fresh Celery
   worker (prefork) with that mode's ``--concurrency``, started once the previous one stopped:

   - ``one``: "one worker": concurrency 1 and the default ``batch_size``
     (``QW_DATA_BATCH_SIZE``, 100,000; ``--batch-size``): the batches and the merge run one
     after another in the one pool process;
   - ``parallel``: "batches in parallel": concurrency 2, the same batches, a chord of
     ``tasks_app.data_batch`` plus the merge, two at a time;
   - ``single``: one batch of all N rows on concurrency 1 (no target: it shows what batching
     saves in memory and costs in time; the service runs a single batch in the task's own
     attempt, without a chord).

   Each mode creates ``R`` DATA_PROCESSING tasks one after another with ``POST /api/tasks/``
   (source: the CSV's URL; operations: validate → clean → cast → dedupe → aggregate as
   docs/task-types.md shapes them; ``max_retries`` 0, so that a failure shows instead of being
   retried) and polls
   the database until each is terminal. A task's time is its ``finished_at`` − the moment
   before its POST (one machine, one clock): create, download, staging in Arrow batches, the
   batches and the merge. The mode's seconds are the median over its ``R`` tasks; rows/s is
   N / seconds; the ratio is the median of the pandas runs paired with them / ours. Each
   task's timeline comes from its log rows (``started``, ``data_staged``,
   ``batches_dispatched``, ``completed``).
   CPU: the user + system time of the worker's processes (all threads; Polars runs its own)
   from ``/proc/<pid>/stat`` before the POST and once the task is terminal; pandas measures
   its own with ``time.process_time()``.
   Memory: just before the worker is stopped, the peak RSS (``VmHWM``) of each of its
   processes (the prefork parent and its pool children, ``pgrep -P``) is read from ``/proc``;
   meanwhile a thread samples their ``VmRSS`` every 50 ms, to tell when in the timeline each
   process reached its largest size.
5. Each task's result is checked against pandas': ``stats.rows_in`` = N, ``stats.invalid`` =
   the rows pandas rejected, the same countries, equal counts, sums and mean ages within 1e-6
   relative. A mismatch is printed as such and the exit code is 1; a task that did not complete
   gives 2.

Targets (the issue's): one worker not slower than pandas (ratio >= 1), batches in parallel at
least twice as fast (ratio >= 2), peak RSS below 500 MB (10⁶ bytes) in every worker process.
A missed target is reported, not an error. The table is printed and
``bench/results/data_latest.json`` written. The machine is shared: the load average at the
start is printed and stored; compare ratios from one run.

``--profile DIR`` records py-spy (``.venv/bin/py-spy``; not part of the dev extras) on each
mode's worker into ``DIR/worker-<mode>.txt`` and prints its hottest project frames; sampling
slows the worker, so a profiled run's figures are not for the targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import polars as pl
import psycopg
import requests

from bench import report, services
from bench.pandas_reference import REQUIRED_PATTERNS
from bench.services import BenchError, Isolation, Processes

DEFAULT_ROWS = 1_000_000
DEFAULT_BATCH_SIZE = 100_000  # QW_DATA_BATCH_SIZE's default
SEED = 20240611
WEB_WORKERS = 2
TASK_TIMEOUT_S = 900  # the task's time limit; its lease is this plus QW_LEASE_SECONDS
POLL_S = 0.2
CSV_NAME = "people.csv"
RESULT_FILE = "data_latest.json"
REL_TOLERANCE = 1e-6
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

# Targets from the data processing issue.
ONE_WORKER_RATIO = 1.0
PARALLEL_RATIO = 2.0
RSS_LIMIT_MB = 500.0

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": list(REQUIRED_PATTERNS),
    "properties": {
        name: {"type": "string", **({"pattern": pattern} if pattern else {})}
        for name, pattern in REQUIRED_PATTERNS.items()
    },
}
OPERATIONS: list[dict[str, Any]] = [
    {"op": "validate", "schema": SCHEMA, "on_invalid": "drop"},
    {
        "op": "clean",
        "trim": True,
        "lower": ["email"],
        "empty_as_null": True,
        "drop_null": ["country"],
    },
    {"op": "cast", "fields": {"amount": "float", "age": "int"}},
    {"op": "dedupe", "keys": ["email"], "keep": "first"},
    {
        "op": "aggregate",
        "group_by": ["country"],
        "metrics": {
            "people": {"count": "*"},
            "total": {"sum": "amount"},
            "mean_age": {"avg": "age"},
        },
    },
]

TASK_SQL = """
SELECT status, extract(epoch FROM finished_at), error FROM tasks_app_task WHERE id = %s
"""
LOG_SQL = """
SELECT event, extract(epoch FROM created_at), message
FROM tasks_app_tasklog WHERE task_id = %s ORDER BY created_at, id
"""


# --- 1. the CSV --------------------------------------------------------------------------------

FIRST_NAMES = [
    "anna", "ben", "chloe", "david", "emma", "felix", "greta", "hugo", "ines", "jonas", "klara",
    "luca", "mia", "noah", "olga", "paul", "quinn", "rosa", "sven", "tara", "umar", "vera",
    "wim", "xenia", "yusuf", "zoe",
]  # fmt: skip
LAST_NAMES = [
    "muller", "schmidt", "dubois", "martin", "rossi", "bianchi", "garcia", "lopez", "nowak",
    "kowalski", "jansen", "devries", "andersson", "silva", "smith", "jones", "tanaka", "sato",
    "costa", "weber",
]  # fmt: skip
COUNTRIES = ["DE", "FR", "IT", "ES", "PL", "NL", "SE", "PT", "GB", "US", "BR", "JP"]
CITIES = [
    "Berlin", "Paris", "Rome", "Madrid", "Warsaw", "Amsterdam", "Stockholm", "Lisbon", "London",
    "New York", "Sao Paulo", "Tokyo", "Hamburg", "Lyon", "Milan", "Seville", "Krakow", "Utrecht",
    "Porto", "Osaka",
]  # fmt: skip
DOMAINS = ["example.com", "mail.example.org", "corp.example.net", "example.de"]
NOTES = [
    "called back, asked about the invoice",
    "prefers email",
    "VIP; handle with care",
    'said "great service", wants a call',
    "moved, new address pending",
    "referred by a friend",
    "no answer",
    "paid late, twice",
]
BAD_AMOUNTS = ["n/a", "12,50", "?", "1.2.3"]


def generate_csv(path: Path, rows: int, seed: int = SEED) -> None:
    """Write ``rows`` people to ``path``: vectorised (numpy draws, Polars string expressions)
    and deterministic for a given seed. Empty fields are written bare (read back as null)."""
    rng = np.random.default_rng(seed)

    def draw(values: list[str]) -> pl.Series:
        return pl.Series(values).gather(rng.integers(0, len(values), rows))

    def chance(p: float) -> pl.Series:
        return pl.Series(rng.random(rows) < p)

    # About 0.7 × rows distinct people: roughly half of the rows repeat an earlier email.
    user = pl.Series(rng.integers(0, max(1, int(rows * 0.7)), rows))
    draws = pl.DataFrame(
        {
            "id": pl.int_range(1, rows + 1, eager=True),
            "user": user,
            "first": pl.Series(FIRST_NAMES).gather(user % len(FIRST_NAMES)),
            "last": pl.Series(LAST_NAMES).gather((user // len(FIRST_NAMES)) % len(LAST_NAMES)),
            "domain": pl.Series(DOMAINS).gather(user % len(DOMAINS)),
            "name_first": draw(FIRST_NAMES),
            "name_last": draw(LAST_NAMES),
            "country": draw(COUNTRIES),
            "city": draw(CITIES),
            "cents": pl.Series(np.round(rng.gamma(2.0, 4000.0, rows)).astype(np.int64) + 1),
            "age": pl.Series(rng.integers(18, 91, rows)),
            "days": pl.Series(rng.integers(0, 4000, rows)),
            "note": draw(NOTES),
            "note_no": pl.Series(rng.integers(1, 1000, rows)),
            "bad_amount": draw(BAD_AMOUNTS),
            "upper": chance(0.15),
            "capital": chance(0.2),
            "lead": chance(0.1),
            "trail": chance(0.1),
            "email_bad": chance(0.003),
            "country_none": chance(0.04),
            "country_pad": chance(0.02),
            "amount_bad": chance(0.01),
            "age_none": chance(0.03),
            "note_none": chance(0.3),
        }
    )
    col = pl.col
    people = draws.select(
        col("id"),
        pl.concat_str(
            pl.when(col("lead")).then(pl.lit("  ")).otherwise(pl.lit("")),
            _cased_email(),
            pl.when(col("trail")).then(pl.lit(" ")).otherwise(pl.lit("")),
        ).alias("email"),
        pl.format(
            "{} {}", col("name_first").str.to_titlecase(), col("name_last").str.to_titlecase()
        ).alias("name"),
        pl.when(col("country_none"))
        .then(pl.lit(None, pl.String))
        .when(col("country_pad"))
        .then(pl.format(" {} ", col("country")))
        .otherwise(col("country"))
        .alias("country"),
        col("city"),
        pl.when(col("amount_bad"))
        .then(col("bad_amount"))
        .otherwise(
            pl.format(
                "{}.{}", col("cents") // 100, (col("cents") % 100).cast(pl.String).str.zfill(2)
            )
        )
        .alias("amount"),
        pl.when(col("age_none"))
        .then(pl.lit(None, pl.String))
        .otherwise(col("age").cast(pl.String))
        .alias("age"),
        (pl.date(2015, 1, 1) + pl.duration(days=col("days"))).cast(pl.String).alias("joined"),
        pl.when(col("note_none"))
        .then(pl.lit(None, pl.String))
        .otherwise(pl.format("{} (#{})", col("note"), col("note_no")))
        .alias("note"),
    )
    people.write_csv(path)


def _cased_email() -> pl.Expr:
    """A person's email in one of three casings, or made invalid (" at " for "@")."""
    col = pl.col
    plain = pl.format("{}.{}{}@{}", col("first"), col("last"), col("user"), col("domain"))
    cased = (
        pl.when(col("upper"))
        .then(plain.str.to_uppercase())
        .when(col("capital"))
        .then(pl.format("{}{}", plain.str.slice(0, 1).str.to_uppercase(), plain.str.slice(1)))
        .otherwise(plain)
    )
    return (
        pl.when(col("email_bad"))
        .then(cased.str.replace("@", " at ", literal=True))
        .otherwise(cased)
    )


# --- 2. the loopback server --------------------------------------------------------------------


class _FileHandler(SimpleHTTPRequestHandler):
    """Serves the folder; counts the files sent instead of logging each request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        server: Any = self.server
        with server.lock:
            server.served += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FileServer:
    """``ThreadingHTTPServer`` on 127.0.0.1 serving ``folder``, in a thread of this process."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_FileHandler, directory=str(folder))
        self.httpd: Any = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.lock = threading.Lock()
        self.httpd.served = 0
        self.netloc = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="csv-server", daemon=True
        )
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://{self.netloc}/{name}"

    @property
    def served(self) -> int:
        return int(self.httpd.served)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- 3. the pandas reference -------------------------------------------------------------------


def run_pandas(csv_path: Path, timeout: float) -> dict[str, Any]:
    """``bench/pandas_reference.py`` as its own process; its JSON line."""
    argv = [sys.executable, "-m", "bench.pandas_reference", str(csv_path)]
    try:
        done = subprocess.run(
            argv,
            cwd=services.ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the pandas reference did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"the pandas reference failed (exit {done.returncode}):\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise BenchError(f"the pandas reference printed nothing; stderr:\n{done.stderr}")
    reference: dict[str, Any] = json.loads(lines[-1])
    return reference


class PandasReference:
    """Runs of the pandas script: the first one's groups and counts are the expected result;
    every run's seconds are kept, since the modes pair their tasks with runs of their own."""

    def __init__(self, csv_path: Path, timeout: float) -> None:
        self.csv_path = csv_path
        self.timeout = timeout
        self.first: dict[str, Any] = {}
        self.runs_s: list[float] = []
        self.peaks_mb: list[float] = []
        self.cpu_s: list[float] = []

    def run(self) -> float:
        outcome = run_pandas(self.csv_path, self.timeout)
        if not self.first:
            self.first = outcome
        self.runs_s.append(float(outcome["seconds"]))
        self.peaks_mb.append(float(outcome["peak_rss_mb"]))
        self.cpu_s.append(float(outcome["cpu_seconds"]))
        return float(outcome["seconds"])

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def peak_rss_mb(self) -> float:
        return max(self.peaks_mb)

    def summary(self) -> dict[str, Any]:
        return {
            **self.first,
            "first_run_s": self.first.get("seconds"),
            "seconds": self.seconds,
            "runs_s": self.runs_s,
            "peak_rss_mb": self.peak_rss_mb,
            "cpu_runs_s": self.cpu_s,
            "cpu_seconds": statistics.median(self.cpu_s),
        }


# --- 4. the service, mode by mode --------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    concurrency: int
    batch_size: int
    target_ratio: float | None


def modes_for(rows: int, batch_size: int | None) -> dict[str, Mode]:
    batches = batch_size or DEFAULT_BATCH_SIZE
    return {
        "one": Mode("one", "one worker", 1, batches, ONE_WORKER_RATIO),
        "parallel": Mode("parallel", "batches in parallel", 2, batches, PARALLEL_RATIO),
        "single": Mode("single", "one batch, one process", 1, max(rows, 1), None),
    }


@dataclass
class TaskRun:
    """One task of a mode: its figures from the database and the worker's RSS meanwhile."""

    task_id: str | None = None
    status: str | None = None
    error: str | None = None
    post_ms: float | None = None
    seconds: float | None = None  # POST → finished_at
    cpu_s: float | None = None  # CPU time of the worker's processes, POST → terminal
    timeline: list[tuple[str, float]] = field(default_factory=list)  # event, s after POST
    # Sampled VmRSS while the task ran: process → (largest MB, seconds after POST).
    rss_sampled: dict[str, tuple[float, float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # the aggregated groups
    downloads: int = 0

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED"


@dataclass
class ModeResult:
    key: str
    label: str
    concurrency: int
    batch_size: int
    target_ratio: float | None
    runs: list[TaskRun] = field(default_factory=list)
    seconds: float | None = None  # median over the runs, if all completed
    cpu_s: float | None = None  # median over the runs
    rows_per_s: float | None = None
    pandas_s: list[float] = field(default_factory=list)  # the pandas runs paired with its tasks
    ratio: float | None = None  # median of pandas_s / seconds
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # "parent 123" → VmHWM, MB
    mismatches: list[str] = field(default_factory=list)
    error: str | None = None
    worker_log: str | None = None
    worker_log_tail: str | None = None
    profile: str | None = None

    @property
    def rss_max_mb(self) -> float | None:
        return max(self.peak_rss_mb.values()) if self.peak_rss_mb else None

    @property
    def completed(self) -> bool:
        return bool(self.runs) and all(run.completed for run in self.runs) and not self.error

    @property
    def status(self) -> str:
        if self.completed:
            return "COMPLETED"
        return next((run.status or "?" for run in self.runs if not run.completed), "not created")

    @property
    def last(self) -> TaskRun:
        return self.runs[-1] if self.runs else TaskRun()


class RssSampler:
    """Samples ``VmRSS`` of a worker's processes every ``interval`` s, in a thread, to tell
    when each peak happens (``VmHWM`` says only how high)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (epoch s, pid, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pids: list[int] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now - refreshed > 1.0:  # a pool child may be replaced: look again each second
                pids, refreshed = [self.pid, *services.child_pids(self.pid)], now
            for pid in pids:
                rss = services.proc_status_bytes(pid, "VmRSS")
                if rss is not None:
                    self.samples.append((now, pid, rss))
            self._stop.wait(self.interval)

    def peaks(self, since: float, until: float) -> dict[int, tuple[int, float]]:
        """pid → (largest sample in bytes, its time − ``since``) over [since, until]."""
        peaks: dict[int, tuple[int, float]] = {}
        for at, pid, rss in list(self.samples):
            if since <= at <= until and rss > peaks.get(pid, (-1, 0.0))[0]:
                peaks[pid] = (rss, at - since)
        return peaks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _after_banner(log_text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a worker's log after Celery's start-up banner."""
    text = log_text.splitlines()
    marks = [i for i, line in enumerate(text) if "[queues]" in line]
    if marks:
        start = marks[-1] + 1
        while start < len(text) and ".>" in text[start]:
            start += 1
        text = text[start:]
    return "\n".join(line for line in text[-lines:] if line.strip())


def _process_name(pid: int, parent: int) -> str:
    return f"{'parent' if pid == parent else 'child'} {pid}"


class Service:
    """gunicorn, and one worker at a time, in the run's own vhost and database."""

    def __init__(self, iso: Isolation, processes: Processes, setup: dict[str, Any]) -> None:
        self.iso = iso
        self.processes = processes
        self.setup = setup
        port = services.free_port()
        services.start_web(processes, port, workers=WEB_WORKERS)
        self.base = f"http://127.0.0.1:{port}"
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers.update({"Authorization": f"Token {setup['token']}"})
        self._warm_up()

    def _warm_up(self) -> None:
        """A few refused creates, so that no mode pays gunicorn's first requests (imports, the
        handler registry, the first database connection of each web worker)."""
        body = {"type": "DATA_PROCESSING", "payload": {"records": [], "operations": [{}]}}
        for _ in range(2 * WEB_WORKERS):
            response = self.session.post(f"{self.base}/api/tasks/", json=body, timeout=60)
            if response.status_code != 400:
                raise BenchError(
                    f"warm-up create: expected 400, got {response.status_code} "
                    f"{response.text[:300]}"
                )

    def run_mode(
        self,
        mode: Mode,
        *,
        source_url: str,
        rows: int,
        repeat: int,
        reference: PandasReference,
        server: FileServer,
        timeout: float,
        profile_dir: Path | None,
        log: Any,
    ) -> ModeResult:
        """A fresh worker with the mode's concurrency; ``repeat`` times a pandas run then a
        task (pairs, so that a change of the machine's load between modes touches both
        sides of the ratio); the worker's peaks; stop."""
        result = ModeResult(
            mode.key, mode.label, mode.concurrency, mode.batch_size, mode.target_ratio
        )
        worker = services.start_worker(
            self.processes,
            self.iso.broker_url,
            self.setup["work_queues"],
            self.iso.run_id,
            concurrency=mode.concurrency,
            name=f"worker-{mode.key}",
        )
        result.worker_log = str(worker.log_path)
        sampler = RssSampler(worker.pid)
        profiler: Any = None
        if profile_dir is not None:
            from bench.workflow_scenario import Profiler

            profile_dir.mkdir(parents=True, exist_ok=True)
            profiler = Profiler(worker, profile_dir / f"worker-{mode.key}.txt")
            time.sleep(1.0)  # py-spy attaches
        try:
            for index in range(repeat):
                result.pandas_s.append(reference.run())
                run = TaskRun()
                result.runs.append(run)
                served_before = server.served
                cpu_before = services.tree_cpu_seconds(worker.pid)
                started = time.time()
                self._task(run, mode, source_url, timeout, worker.check_alive, log)
                run.cpu_s = round(services.tree_cpu_seconds(worker.pid) - cpu_before, 2)
                run.downloads = server.served - served_before
                run.rss_sampled = {
                    _process_name(pid, worker.pid): (round(peak / 1e6, 1), round(at, 2))
                    for pid, (peak, at) in sampler.peaks(started, time.time()).items()
                }
                if not run.completed:
                    break
                log(
                    f"  run {index + 1} of {repeat}: {run.seconds:.2f} s "
                    f"(pandas just before: {result.pandas_s[-1]:.2f} s)"
                )
        except BenchError as exc:
            result.error = str(exc)
        finally:
            sampler.stop()
            if profiler is not None:
                profiler.stop()
                if profiler.out.exists():
                    result.profile = str(profiler.out)
            # The peaks go with the processes: read them before the stop.
            result.peak_rss_mb = {
                _process_name(pid, worker.pid): round(peak / 1e6, 1)
                for pid, peak in services.tree_peak_rss(worker.pid).items()
            }
            self.processes.stop(worker)
        if result.runs and result.completed:
            result.seconds = statistics.median(run.seconds or 0.0 for run in result.runs)
            result.rows_per_s = rows / result.seconds if result.seconds else None
            result.ratio = statistics.median(result.pandas_s) / result.seconds
            result.cpu_s = statistics.median(run.cpu_s or 0.0 for run in result.runs)
        elif result.last.task_id:
            result.worker_log_tail = _after_banner(worker.tail(200))
        return result

    def _task(
        self,
        run: TaskRun,
        mode: Mode,
        source_url: str,
        timeout: float,
        check: Any,
        log: Any,
    ) -> None:
        body = {
            "type": "DATA_PROCESSING",
            "payload": {
                "source": source_url,
                "operations": OPERATIONS,
                "batch_size": mode.batch_size,
            },
            "timeout_s": TASK_TIMEOUT_S,
            "max_retries": 0,  # a failure shows at once, instead of being retried and timed
        }
        started = time.time()
        try:
            response = self.session.post(f"{self.base}/api/tasks/", json=body, timeout=60)
        except requests.RequestException as exc:
            raise BenchError(f"POST /api/tasks/: {exc}") from exc
        run.post_ms = (time.time() - started) * 1000
        if response.status_code != 201:
            raise BenchError(f"POST /api/tasks/: HTTP {response.status_code} {response.text[:800]}")
        task_id = run.task_id = str(response.json()["id"])
        log(f"  task {task_id} created in {run.post_ms:.0f} ms; waiting for it to finish")
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        with psycopg.connect(self.iso.database_url, autocommit=True) as conn:
            while True:
                check()
                row = conn.execute(TASK_SQL, (task_id,)).fetchone()
                assert row is not None
                run.status = str(row[0])
                if run.status in TERMINAL:
                    break
                now = time.monotonic()
                if now > deadline:
                    run.error = f"timeout: still {run.status} after {timeout:.0f} s"
                    break
                if now - last_report >= 10:
                    log(f"  … {run.status} after {time.time() - started:.0f} s")
                    last_report = now
                time.sleep(POLL_S)
            finished, error = row[1], row[2]
            events = conn.execute(LOG_SQL, (task_id,)).fetchall()
        moments = [(str(event), at) for event, at, _ in events]
        moments.append(("finished_at", finished))
        run.timeline = [
            (name, round(float(at) - started, 3)) for name, at in moments if at is not None
        ]
        if error:
            run.error = str(error)
        if not run.completed:
            return
        run.seconds = float(finished) - started
        response = self.session.get(f"{self.base}/api/tasks/{task_id}/", timeout=60)
        if response.status_code != 200:
            raise BenchError(f"GET /api/tasks/{task_id}/: HTTP {response.status_code}")
        outcome = response.json().get("result") or {}
        run.stats = outcome.get("stats") or {}
        if isinstance(outcome.get("rows"), list):
            run.rows = outcome["rows"]
        else:
            run.error = f"the result holds no inline rows (keys {sorted(outcome)})"


# --- 5. the check against pandas ---------------------------------------------------------------


def _close(ours: Any, theirs: Any) -> bool:
    if ours is None or theirs is None:
        return ours is None and theirs is None
    a, b = float(ours), float(theirs)
    return abs(a - b) <= REL_TOLERANCE * max(abs(a), abs(b), 1e-12)


def compare(run: TaskRun, reference: dict[str, Any], rows: int) -> list[str]:
    """What differs between a task's aggregated rows (and row counts) and pandas'."""
    problems: list[str] = []
    if run.stats.get("rows_in") != rows:
        problems.append(f"stats.rows_in is {run.stats.get('rows_in')}, the CSV has {rows}")
    if run.stats.get("invalid") != reference["invalid"]:
        problems.append(
            f"stats.invalid is {run.stats.get('invalid')}, pandas rejected {reference['invalid']}"
        )
    ours = {row.get("country"): row for row in run.rows}
    theirs = {group["country"]: group for group in reference["groups"]}
    if len(ours) != len(run.rows):
        problems.append(f"{len(run.rows)} rows for {len(ours)} countries: a group repeats")
    if set(ours) != set(theirs):
        problems.append(
            f"groups differ: only in the service {sorted(map(str, set(ours) - set(theirs)))}, "
            f"only in pandas {sorted(set(theirs) - set(ours))}"
        )
    for country in sorted(set(ours) & set(theirs), key=str):
        mine, other = ours[country], theirs[country]
        if mine.get("people") != other["people"]:
            problems.append(f"{country}: people {mine.get('people')} != pandas {other['people']}")
        for metric in ("total", "mean_age"):
            if not _close(mine.get(metric), other[metric]):
                problems.append(f"{country}: {metric} {mine.get(metric)} != pandas {other[metric]}")
    return problems


# --- the report --------------------------------------------------------------------------------


def targets(results: list[ModeResult]) -> list[tuple[str, str, str, str]]:
    """(what, target, value, MET | MISSED | n/a)."""
    out: list[tuple[str, str, str, str]] = []
    for result in results:
        if result.target_ratio is None:
            continue
        ok = (
            result.completed
            and not result.mismatches
            and (result.ratio or 0) >= result.target_ratio
        )
        value = "—" if result.ratio is None else f"{result.ratio:.2f}x"
        status = "n/a" if result.ratio is None else ("MET" if ok else "MISSED")
        out.append((f"{result.label} vs pandas", f">= {result.target_ratio:g}x", value, status))
    # The memory target applies to the service as configured (the batched modes); the
    # single-batch mode is there to show what batching saves.
    measured = [r for r in results if r.rss_max_mb is not None and r.target_ratio is not None]
    if measured:
        worst = max(measured, key=lambda r: r.rss_max_mb or 0.0)
        peak = worst.rss_max_mb or 0.0
        out.append(
            (
                "peak RSS per worker process",
                f"< {RSS_LIMIT_MB:.0f} MB",
                f"{peak:,.0f} MB ({worst.key})",
                "MET" if peak < RSS_LIMIT_MB else "MISSED",
            )
        )
    return out


def _num(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def render(
    *,
    rows: int,
    csv_mb: float,
    repeat: int,
    reference: dict[str, Any] | None,
    results: list[ModeResult],
) -> str:
    header = (
        "mode",
        "procs",
        "batches",
        "seconds",
        "rows/s",
        "vs pandas",
        "CPU s",
        "peak RSS",
        "result",
    )
    table: list[tuple[str, ...]] = []
    if reference is not None:
        table.append(
            (
                "pandas, standalone script",
                "1",
                "—",
                _num(reference["seconds"], ".2f"),
                _num(rows / reference["seconds"], ",.0f"),
                "1.00x",
                _num(reference.get("cpu_seconds"), ".2f"),
                _num(reference["peak_rss_mb"], ",.0f", " MB"),
                f"{len(reference['groups'])} groups",
            )
        )
    for r in results:
        batches = r.last.stats.get("batches", math.ceil(rows / r.batch_size))
        if not r.completed:
            verdict = r.status
        elif r.mismatches:
            verdict = "MISMATCH"
        else:
            verdict = f"{len(r.last.rows)} groups ok"
        table.append(
            (
                f"{r.label} (c={r.concurrency})",
                str(len(r.peak_rss_mb) or r.concurrency + 1),
                f"{batches} × {r.batch_size:,}",
                _num(r.seconds, ".2f"),
                _num(r.rows_per_s, ",.0f"),
                _num(r.ratio, ".2f", "x"),
                _num(r.cpu_s, ".2f"),
                _num(r.rss_max_mb, ",.0f", " MB"),
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  " + "  ".join([row[0].ljust(widths[0]), *rest])

    median = f", median of {repeat} runs" if repeat > 1 else ""
    out = [
        f"DATA_PROCESSING bench: {rows:,} rows ({csv_mb:,.1f} MB of CSV over loopback HTTP), "
        f"validate → clean → cast → dedupe → aggregate{median}",
        "  seconds: POST /api/tasks/ → the task's finished_at (download, staging, batches, "
        "merge); pandas: read_csv → groupby, in its own process",
        "  procs: the worker's processes (prefork parent + pool children); peak RSS: the "
        "largest VmHWM among them (MB = 10⁶ bytes)",
        "  vs pandas: the median of the pandas runs made just before the mode's tasks / the "
        "mode's seconds; the pandas row: the median of all its runs",
        "  CPU s: user + system CPU time over the same span (every process and thread; less "
        "sensitive than seconds to the machine's other load)",
        "",
        line(header),
        line(tuple("-" * width for width in widths)),
    ]
    out += [line(row) for row in table]
    out.append("")
    if reference is not None:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in reference["steps_s"].items())
        runs = ", ".join(f"{v:.2f}" for v in reference.get("runs_s", []))
        out.append(f"  pandas {reference['pandas']}, first run: {steps} s")
        out.append(f"    every run (the table: their median): {runs} s")
        out.append(
            f"    rows in {reference['rows_in']:,}, invalid {reference['invalid']:,}, "
            f"after clean {reference['rows_clean']:,}, unique {reference['rows_unique']:,}"
        )
    for r in results:
        out.append(f"  {r.label} (worker -c {r.concurrency}, batch_size {r.batch_size:,}):")
        if r.pandas_s:
            paired = ", ".join(f"{v:.2f}" for v in r.pandas_s)
            out.append(
                f"    pandas runs paired with its tasks: {paired} s "
                f"(median {statistics.median(r.pandas_s):.2f} s: the ratio's numerator)"
            )
        if r.peak_rss_mb:
            peaks = ", ".join(f"{name} {mb:,.0f} MB" for name, mb in r.peak_rss_mb.items())
            out.append(f"    peak RSS (VmHWM): {peaks}")
        for number, run in enumerate(r.runs, start=1):
            out.append(
                f"    run {number}: task {run.task_id} {run.status}"
                + (f" in {run.seconds:.2f} s" if run.seconds else "")
                + (f" ({run.cpu_s:.2f} CPU s)" if run.cpu_s is not None else "")
                + f", POST {_num(run.post_ms, '.0f', ' ms')}, CSV downloads {run.downloads}"
            )
            if run.timeline:
                out.append(
                    "      timeline: " + ", ".join(f"{n} +{t:.2f}s" for n, t in run.timeline)
                )
            if run.rss_sampled:
                sampled = ", ".join(
                    f"{name} {mb:,.0f} MB at +{at:.2f}s"
                    for name, (mb, at) in run.rss_sampled.items()
                )
                out.append(f"      largest VmRSS sampled every 50 ms: {sampled}")
            if run.error:
                out.append(f"      ERROR: {run.error}")
        stats = r.last.stats
        if stats:
            steps = "; ".join(
                f"{op.get('op')} {op.get('rows_in', '?'):,}→{op.get('rows_out', '?'):,}"
                if isinstance(op.get("rows_in"), int) and isinstance(op.get("rows_out"), int)
                else f"{op.get('op')} {op}"
                for op in stats.get("operations", [])
            )
            out.append(
                f"    stats: rows_in {stats.get('rows_in')}, invalid {stats.get('invalid')}, "
                f"rows_out {stats.get('rows_out')}, batches {stats.get('batches')} ({steps})"
            )
        if r.error:
            out.append(f"    ERROR: {r.error}")
        for problem in r.mismatches:
            out.append(f"    MISMATCH with pandas: {problem}")
        if r.worker_log_tail:
            out.append(f"    worker log ({r.worker_log}), last lines:")
            out += [f"      | {text}" for text in r.worker_log_tail.splitlines()]
        if r.profile:
            from bench.workflow_scenario import hottest

            out.append(f"    py-spy: {r.profile} (% of samples with the function on the stack)")
            out += [f"      {share:5.1f} %  {frame}" for frame, share in hottest(Path(r.profile))]
    out.append("  targets:")
    for name, target, value, status in targets(results):
        out.append(f"    {name:<32} {target:<10} {value:>16}  {status}")
    return "\n".join(out)


# --- the command line --------------------------------------------------------------------------


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data_scenario",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows of the CSV")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size of the batched modes (default {DEFAULT_BATCH_SIZE:,}, the service's)",
    )
    parser.add_argument(
        "--modes",
        default="one,parallel,single",
        help="which modes, in order, comma-separated (one, parallel, single)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of pandas, and tasks per mode (on the same worker); the median counts "
        "(default 3)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="the CSV generator's seed")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for each task"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the CSV, the database, the vhost and the logs"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy each worker into DIR"
    )
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.mode_keys = [key.strip() for key in args.modes.split(",") if key.strip()]
    unknown = set(args.mode_keys) - {"one", "parallel", "single"}
    if unknown or not args.mode_keys:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose among one, parallel, single")
    return args


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    work_dir = Path(tempfile.mkdtemp(prefix="qw-data-bench-"))
    csv_path = work_dir / CSV_NAME
    iso = Isolation()
    server: FileServer | None = None
    processes: Processes | None = None
    reference: dict[str, Any] | None = None
    pandas: PandasReference | None = None
    results: list[ModeResult] = []
    error: str | None = None
    exit_code = 1
    csv_mb = 0.0
    generate_s = 0.0
    load_at_start = os.getloadavg()
    log(
        f"data bench {iso.run_id}: CSV in {work_dir}, vhost and database {iso.name}; "
        f"load average {load_at_start[0]:.2f} on {os.cpu_count()} CPUs"
    )
    try:
        t0 = time.perf_counter()
        generate_csv(csv_path, args.rows, args.seed)
        generate_s = time.perf_counter() - t0
        csv_mb = csv_path.stat().st_size / 1e6
        log(f"generated {args.rows:,} rows, {csv_mb:,.1f} MB, in {generate_s:.1f} s")

        log("pandas reference, its own process")
        pandas = PandasReference(csv_path, args.timeout)
        pandas.run()
        reference = pandas.first
        log(
            f"  {reference['seconds']:.2f} s, peak RSS {reference['peak_rss_mb']:,.0f} MB, "
            f"{len(reference['groups'])} groups"
        )

        server = FileServer(work_dir)
        env = {
            **iso.env,
            "QW_HTTP_ALLOWED_HOSTS": server.netloc,
            "QW_ARTIFACT_ROOT": str(iso.log_dir / "artifacts"),
        }
        processes = Processes(env=env, log_dir=iso.log_dir)
        log("setting up: vhost, database, migrate, user and token, gunicorn")
        service = Service(iso, processes, iso.setup(processes))
        modes = modes_for(args.rows, args.batch_size)
        for key in args.mode_keys:
            mode = modes[key]
            log(f"mode {mode.label}: worker -c {mode.concurrency}, batch_size {mode.batch_size:,}")
            result = service.run_mode(
                mode,
                source_url=server.url(CSV_NAME),
                rows=args.rows,
                repeat=args.repeat,
                reference=pandas,
                server=server,
                timeout=args.timeout,
                profile_dir=args.profile,
                log=log,
            )
            for number, run in enumerate(result.runs, start=1):
                if run.completed:
                    where = f"run {number}: " if len(result.runs) > 1 else ""
                    result.mismatches += [f"{where}{p}" for p in compare(run, reference, args.rows)]
            log(
                f"  {result.status}"
                + (f": {result.seconds:.2f} s" if result.seconds else "")
                + (f": {result.error or result.last.error}" if not result.completed else "")
            )
            results.append(result)
        incomplete = any(not r.completed for r in results)
        mismatched = any(r.mismatches for r in results)
        exit_code = 1 if mismatched else 2 if incomplete else 0
    except KeyboardInterrupt:
        error, exit_code = "interrupted", 130
        log("\ninterrupted: cleaning up")
    except BenchError as exc:
        error = str(exc)
        log(f"\nFAILED: {exc}")
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log(f"\nFAILED:\n{traceback.format_exc()}")
    finally:
        if processes is not None:
            processes.stop_all()
        if server is not None:
            server.close()
    log("")
    log(
        render(
            rows=args.rows,
            csv_mb=csv_mb,
            repeat=args.repeat,
            reference=pandas.summary() if pandas and pandas.runs_s else None,
            results=results,
        )
    )
    if any(r.mismatches for r in results):
        log("\n!!! RESULT MISMATCH: the service's aggregate differs from pandas' (see above) !!!")
    path = report.write_json(
        {
            "run_id": iso.run_id,
            "finished_at": datetime.now(UTC).isoformat(),
            "rows": args.rows,
            "seed": args.seed,
            "repeat": args.repeat,
            "csv_mb": csv_mb,
            "generate_s": generate_s,
            "operations": OPERATIONS,
            "pandas": pandas.summary() if pandas and pandas.runs_s else None,
            "modes": [
                {**asdict(r), "rss_max_mb": r.rss_max_mb, "completed": r.completed} for r in results
            ],
            "targets": [
                {"name": n, "target": t, "value": v, "status": s} for n, t, v, s in targets(results)
            ],
            "host": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "polars": pl.__version__,
                "platform": platform.platform(),
                "loadavg_at_start": load_at_start,
                "loadavg_at_end": os.getloadavg(),
            },
            "error": error,
            "exit_code": exit_code,
        },
        report.RESULTS_DIR / RESULT_FILE,
    )
    log(f"results: {path}")
    iso.finish(keep=args.keep, succeeded=exit_code == 0, log=log)
    if args.keep:
        log(f"kept (--keep): CSV {csv_path}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return exit_code


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"(data bench took {time.monotonic() - started:.0f} s)", flush=True)
    sys.exit(code)
