"""Isolation (a RabbitMQ vhost and a PostgreSQL database per run) and child processes.

Everything the benchmark creates is named ``qw_bench_<run id>`` and removed by ``teardown``;
children run in their own process groups (``start_new_session``) with their output in a log
directory, and are stopped group by group.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests
from kombu import Connection
from psycopg import sql

from queueworker import messaging

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
BENCH_USERNAME = "bench"
JSON_MARKER = "BENCH_JSON:"


class BenchError(RuntimeError):
    """A setup step or a child process failed; the message says which."""


# --- child processes ---------------------------------------------------------------------------


def executable(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


@dataclass
class Child:
    """A child process in its own process group, output to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with code {self.popen.returncode}; last output:\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group (warm shutdown), SIGKILL it if it lingers, reap the leader."""
        if self.alive():
            _killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        # Pool children or gunicorn workers orphaned by the leader's exit share its group.
        _killpg(self.pid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Processes:
    """Starts children with one environment and log directory; stops them all at the end."""

    env: dict[str, str]
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C reaches only us
            )
        child = Child(name, argv, log_path, popen)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            try:
                self.stop(child)
            except Exception as exc:  # keep stopping the others
                print(f"  could not stop {child.name} (pid {child.pid}): {exc}", file=sys.stderr)

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def run(self, name: str, argv: list[str], timeout: float = 300.0) -> str:
        """Run a short command to completion (migrate, shell); return its stdout."""
        log_path = self.log_dir / f"{name}.log"
        try:
            done = subprocess.run(
                argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{name} did not finish within {timeout:.0f}s") from exc
        log_path.write_text(f"$ {' '.join(argv)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
        if done.returncode != 0:
            last = "\n".join(done.stderr.splitlines()[-15:])
            raise BenchError(f"{name} failed (exit {done.returncode}), stderr ends:\n{last}")
        return done.stdout


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (``pgrep -P``): a prefork worker's pool processes."""
    try:
        done = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(int(word) for word in done.stdout.split() if word.isdigit())


def proc_status_bytes(pid: int, key: str = "VmHWM") -> int | None:
    """A size from /proc/<pid>/status in bytes: ``VmHWM`` (peak resident set, the default) or
    ``VmRSS`` (now); None if the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # the kernel's "kB" are KiB
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process so far, all its threads (/proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (a prefork worker and its pool)."""
    return sum(cpu_seconds(each) or 0.0 for each in (pid, *child_pids(pid)))


def tree_peak_rss(pid: int) -> dict[int, int]:
    """Peak RSS in bytes of ``pid`` and of each of its direct children, by pid (read them
    before stopping the process: the figures go with it)."""
    peaks: dict[int, int] = {}
    for each in (pid, *child_pids(pid)):
        peak = proc_status_bytes(each)
        if peak is not None:
            peaks[each] = peak
    return peaks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    check: Callable[[], None] | None = None,
) -> Any:
    """Poll ``predicate`` until truthy; ``check`` (e.g. children alive) runs before each poll."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def queue_stats(broker_url: str, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of ``queue`` by a passive declare; None if it does not exist."""
    with Connection(broker_url, connect_timeout=5) as conn:
        channel: Any = conn.channel()  # an amqp channel (kombu types it as StdChannel)
        try:
            _, messages, consumers = channel.queue_declare(queue=queue, passive=True)
        except conn.channel_errors:
            return None  # 404: the server closed the channel
        finally:
            try:
                channel.close()
            except Exception:  # already closed by the server
                pass
        return int(messages), int(consumers)


def queues_consumed(broker_url: str, queues: Iterable[str]) -> bool:
    for queue in queues:
        stats = queue_stats(broker_url, queue)
        if stats is None or stats[1] < 1:
            return False
    return True


# --- isolation ---------------------------------------------------------------------------------


def _base_url(
    bench_var: str, service_var: str, scheme_prefixes: tuple[str, ...], default: str
) -> str:
    for name in (bench_var, service_var):
        value = os.environ.get(name, "")
        if value.startswith(scheme_prefixes):
            return value
    return default


def _rabbitmqctl(*args: str) -> None:
    try:
        subprocess.run(
            ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=90
        )
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {exc}") from exc


SETUP_SCRIPT = f"""
import json
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.authtoken.models import Token

user = get_user_model().objects.create_user(username={BENCH_USERNAME!r}, password=None)
token = Token.objects.create(user=user)
with connection.cursor() as cursor:
    cursor.execute("SHOW synchronous_commit")
    server_sync = cursor.fetchone()[0]
print({JSON_MARKER!r} + json.dumps({{
    "token": token.key,
    "prefetch_multiplier": settings.CELERY_WORKER_PREFETCH_MULTIPLIER,
    "confirm_publish": bool(settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("confirm_publish")),
    "acks_late": settings.CELERY_TASK_ACKS_LATE,
    "reject_on_worker_lost": settings.CELERY_TASK_REJECT_ON_WORKER_LOST,
    "worker_sync_commit": settings.QW_WORKER_SYNC_COMMIT,
    "server_synchronous_commit": server_sync,
    "db_reuse_max": settings.CELERY_DB_REUSE_MAX,
    "conn_max_age": settings.DATABASES["default"].get("CONN_MAX_AGE"),
    "debug": settings.DEBUG,
    "log_level": settings.LOG_LEVEL,
    "throttle_create": settings.QW_THROTTLE_CREATE,
    "bulk_max": settings.QW_BULK_MAX,
    "work_queues": [q.name for q in settings.CELERY_TASK_QUEUES],
    "noop_queue": settings.QW_TYPE_ROUTES.get("NOOP", settings.CELERY_TASK_DEFAULT_QUEUE),
}}))
"""


@dataclass
class Isolation:
    """The run's own vhost and database; ``env`` is what every child process gets."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    base_database_url: str = field(
        default_factory=lambda: _base_url(
            "QW_BENCH_DATABASE_URL", "DATABASE_URL", ("postgres",), DEFAULT_DATABASE_URL
        )
    )
    base_broker_url: str = field(
        default_factory=lambda: _base_url(
            "QW_BENCH_BROKER_URL", "CELERY_BROKER_URL", ("amqp", "pyamqp"), DEFAULT_BROKER_URL
        )
    )
    log_dir: Path = field(init=False)
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(50))
    vhost_created: bool = False
    database_created: bool = False

    def __post_init__(self) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"qw-bench-{self.run_id}-"))

    @property
    def name(self) -> str:
        return f"qw_bench_{self.run_id}"

    @property
    def database_url(self) -> str:
        return urlunsplit(urlsplit(self.base_database_url)._replace(path=f"/{self.name}"))

    @property
    def broker_url(self) -> str:
        return messaging.with_vhost(self.base_broker_url, self.name)  # each URL of a failover list

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            CELERY_BROKER_URL=self.broker_url,
            DJANGO_SETTINGS_MODULE="queueworker.settings",
            QW_VAR_DIR=str(self.log_dir / "var"),
            # The run's own: settings refuse to start without one on PostgreSQL with DEBUG off.
            DJANGO_SECRET_KEY=env.get("DJANGO_SECRET_KEY") or self.secret_key,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        )
        # Per-request/per-task INFO logging is not part of the hot path being measured; the
        # worker runs with -l WARNING as well. An explicit LOG_LEVEL in the environment wins.
        env.setdefault("LOG_LEVEL", "warning")
        return env

    def _admin_connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.base_database_url, autocommit=True, connect_timeout=5)

    def setup(self, processes: Processes) -> dict[str, Any]:
        """Create vhost and database, migrate, create the user and token; return the mode."""
        broker_user = urlsplit(self.base_broker_url).username or "guest"
        _rabbitmqctl("add_vhost", self.name)
        self.vhost_created = True
        _rabbitmqctl("set_permissions", "-p", self.name, broker_user, ".*", ".*", ".*")
        try:
            with self._admin_connect() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        except psycopg.Error as exc:
            raise BenchError(f"cannot create database {self.name}: {exc}") from exc
        self.database_created = True
        python = sys.executable
        processes.run("migrate", [python, "manage.py", "migrate", "--no-input", "-v", "0"])
        out = processes.run("setup", [python, "manage.py", "shell", "-c", SETUP_SCRIPT])
        for line in out.splitlines():
            if line.startswith(JSON_MARKER):
                mode: dict[str, Any] = json.loads(line[len(JSON_MARKER) :])
                return mode
        raise BenchError(f"setup printed no {JSON_MARKER} line:\n{out[-2000:]}")

    def teardown(self) -> list[str]:
        """Drop the database and the vhost; return what could not be removed."""
        problems: list[str] = []
        if self.database_created:
            try:
                with self._admin_connect() as conn:
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(self.name)
                        )
                    )
                self.database_created = False
            except psycopg.Error as exc:
                problems.append(f"database {self.name}: {exc}")
        if self.vhost_created:
            try:
                _rabbitmqctl("delete_vhost", self.name)
                self.vhost_created = False
            except BenchError as exc:
                problems.append(f"vhost {self.name}: {exc}")
        return problems

    def remove_logs(self) -> None:
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def finish(self, *, keep: bool, succeeded: bool, log: Callable[[str], None]) -> None:
        """The end of a run: keep everything (``--keep``), or drop the database and the vhost,
        and the child logs too when the run succeeded and nothing was left behind."""
        if keep:
            log(f"kept (--keep): database {self.database_url}, vhost {self.name}")
            log(f"logs in {self.log_dir}")
            return
        problems = self.teardown()
        for problem in problems:
            log(f"cleanup: could not remove {problem}")
        if succeeded and not problems:
            self.remove_logs()
        else:
            log(f"child logs kept in {self.log_dir}")


# --- the service's processes -------------------------------------------------------------------


# Workers run below the web processes' priority (nice 10), as the deployment should: a create
# then waits for its own CPU, not behind a pool draining a backlog. The bare yardstick's worker
# gets the same niceness. QW_BENCH_WORKER_NICE=0 runs them at the web's priority. The service's
# own lowering (QW_WORKER_NICE) is turned off in every worker the bench starts, so that both
# run at exactly the niceness the bench gives them.
WORKER_NICE = int(os.environ.get("QW_BENCH_WORKER_NICE", "10"))
WORKER_ENV = {"QW_WORKER_NICE": "0"}


def niced() -> list[str]:
    """The prefix that starts a worker at ``WORKER_NICE`` (nothing where ``nice`` is absent)."""
    path = shutil.which("nice")
    return [path, "-n", str(WORKER_NICE)] if path and WORKER_NICE else []


def start_web(processes: Processes, port: int, workers: int = 2) -> Child:
    argv = [
        executable("gunicorn"),
        "queueworker.wsgi",
        "--workers",
        str(workers),
        "--bind",
        f"127.0.0.1:{port}",
    ]
    child = processes.start("web", argv)
    wait_until(
        lambda: http_ok(f"http://127.0.0.1:{port}/api/health/live/"),
        timeout=60,
        what="gunicorn to answer /api/health/live/",
        interval=0.2,
        check=child.check_alive,
    )
    return child


def start_worker(
    processes: Processes,
    broker_url: str,
    queues: list[str],
    run_id: str,
    concurrency: int = 2,
    name: str = "worker",
) -> Child:
    """``celery -A queueworker worker`` without ``-Q``: every work queue (docs/architecture.md).

    ``name`` names the child and its log (``<log dir>/<name>.log``)."""
    argv = [
        *niced(),
        executable("celery"),
        "-A",
        "queueworker",
        "worker",
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "-n",
        f"qw_bench_{run_id}@%h",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
    ]
    child = processes.start(name, argv, WORKER_ENV)
    wait_until(
        lambda: queues_consumed(broker_url, queues),
        timeout=90,
        what=f"the worker to consume {', '.join(queues)}",
        interval=0.3,
        check=child.check_alive,
    )
    return child
