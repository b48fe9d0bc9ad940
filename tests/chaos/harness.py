"""The chaos harness: sizes, service processes, and the faults it injects.

Every fault touches only what this test session owns: the processes it started (``Proc``
objects, signalled by their own pid or process group), the connections of its own RabbitMQ
vhost, and the backends of its own PostgreSQL database. Outages of a whole service go through a
TCP proxy (``tests/chaos/proxy.py``) that the harness switches off; the machine's own servers
are never stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from django.db import connection
from kombu import Producer

from queueworker import messaging
from queueworker.celery import app
from tests import session_env
from tests.conftest import Proc, child_database_url, service_env, wait_for

SCALE = float(os.environ.get("QW_CHAOS_SCALE", "1"))
# How long a whole service (RabbitMQ, PostgreSQL) stays unreachable; the figure is 30 s.
OUTAGE_S = float(os.environ.get("QW_CHAOS_OUTAGE_S", "30"))
WORK_QUEUES = tuple(q.name for q in messaging.work_queues(messaging.DEFAULT_TYPE_ROUTES))
ALL_QUEUES = (*WORK_QUEUES, messaging.DEAD_LETTER_QUEUE)

# Worker and beat settings for the suite: none. Faults are injected at the shipped defaults
# (QW_LEASE_SECONDS, sweep and dispatch intervals, QW_REDISPATCH_SECONDS, backoff), so that the
# recovery times the suite reports are the ones a deployment gets. A test that needs another
# value names it where it spawns its processes.
SERVICE_ENV: dict[str, str] = {}


def scaled(full: int, minimum: int = 1) -> int:
    """``full`` (the issue's size) times ``QW_CHAOS_SCALE``, at least ``minimum``."""
    return max(minimum, round(full * SCALE))


def mean_sleep_ms(tasks: int, busy_s: float, processes: int = 4) -> int:
    """The mean sleep that keeps ``processes`` pool processes busy with ``tasks`` for
    ``busy_s``: the faults then land while work is in flight, whatever the scale."""
    return max(10, min(500, int(busy_s * processes * 1000 / tasks)))


def unfinished_tasks(task_type: str | None = None) -> int:
    from tasks_app.models import TERMINAL_STATUSES, Task

    tasks = Task.objects.exclude(status__in=TERMINAL_STATUSES)
    return (tasks.filter(type=task_type) if task_type else tasks).count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- processes ---------------------------------------------------------------------------------


class Proxy:
    """A TCP proxy process in front of one service; ``off()`` is that service's outage."""

    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port
        self.switched = {"off": 0, "on": 0}

    def _switch(self, state: str, sig: int) -> None:
        self.switched[state] += 1
        os.kill(self.proc.popen.pid, sig)  # the proxy process this harness started
        self.proc.wait_for_output(f"proxy {state} {self.switched[state]}\n", timeout=10)

    def off(self) -> None:
        self._switch("off", signal.SIGUSR1)

    def on(self) -> None:
        self._switch("on", signal.SIGUSR2)


class Web:
    """A real ``gunicorn queueworker.wsgi`` process and a token-authenticated HTTP client."""

    def __init__(self, proc: Proc, port: int, token: str) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {self.token}"
        return session

    def live(self) -> bool:
        try:
            return requests.get(f"{self.base}/api/health/live/", timeout=2).status_code == 200
        except requests.RequestException:
            return False


class Services:
    """Starts gunicorn and proxies for one test (workers and beat come from ``spawn``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.tmp_path / f"{name}.log")
        self.started.append(proc)
        return proc

    def proxy(self, target_url: str) -> Proxy:
        """A proxy to the host and port of ``target_url`` (a database or broker URL)."""
        parts = urlsplit(target_url)
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "tests.chaos.proxy",
            str(port),
            parts.hostname or "127.0.0.1",
            str(parts.port or (5672 if parts.scheme.startswith("amqp") else 5432)),
        ]
        proc = self._start(f"proxy{len(self.started)}", argv, service_env())
        proc.wait_for_output("proxy listening", timeout=15)
        return Proxy(proc, port)

    def web(self, *, token: str, workers: int = 2, **env: str) -> Web:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "queueworker.wsgi",
            "--workers",
            str(workers),
            "--bind",
            f"127.0.0.1:{port}",
            "--timeout",
            "60",
        ]
        proc = self._start(f"web{len(self.started)}", argv, service_env(**env))
        web = Web(proc, port, token)

        def up() -> bool:
            if proc.popen.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{proc.output()[-4000:]}")
            return web.live()

        wait_for(up, timeout=60, interval=0.2)
        return web

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


def via_proxy(url: str, proxy: Proxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def database_url() -> str:
    return child_database_url()


def broker_url() -> str:
    return str(app.conf.broker_url)


def rss_kib(pid: int) -> int:
    """Resident set size of one process, from /proc (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def group_rss_kib(proc: Proc) -> int:
    """RSS of a started process and its direct children (a worker and its pool)."""
    return rss_kib(proc.popen.pid) + sum(rss_kib(pid) for pid in proc.children())


def kill_pool_child(worker: Proc) -> int | None:
    """SIGKILL one pool process of a worker this harness started; its pid, or None."""
    children = worker.children()
    if not children:
        return None
    pid = random.choice(children)
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_round(
    workers: list[Proc],
    spawn: Any,
    rng: random.Random,
    kills: dict[str, int],
    in_flight: list[int],
    task_type: str | None = None,
) -> None:
    """Fault 1's round: a second in, a pool child SIGKILLed; a second later a whole worker
    SIGKILLed and started again. Counts what was unfinished before each kill in ``in_flight``
    and the kills in ``kills`` (``"pool child"``, ``"whole worker"``)."""
    time.sleep(1.0)
    in_flight.append(unfinished_tasks(task_type))
    if kill_pool_child(rng.choice(workers)) is not None:
        kills["pool child"] += 1
    time.sleep(1.0)
    in_flight.append(unfinished_tasks(task_type))
    victim = rng.randrange(len(workers))
    workers[victim].kill(signal.SIGKILL)
    kills["whole worker"] += 1
    workers[victim] = spawn("worker", **SERVICE_ENV)


# --- RabbitMQ: the session's own vhost only ----------------------------------------------------


def declare_queues() -> None:
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in messaging.work_queues(messaging.DEFAULT_TYPE_ROUTES):
            queue(channel).declare()
        messaging.dead_letter_queue()(channel).declare()


def queue_depths() -> dict[str, int]:
    """Ready messages per queue of the session's vhost (a passive declare: no management API)."""
    depths = {}
    with app.connection_for_write() as conn:
        for name in ALL_QUEUES:
            channel: Any = conn.channel()
            try:
                _, messages, _ = channel.queue_declare(queue=name, passive=True)
                depths[name] = int(messages)
            except conn.channel_errors:
                depths[name] = 0  # not declared yet: nothing in it
            finally:
                try:
                    channel.close()
                except Exception:
                    pass
    return depths


def purge_queues() -> None:
    """Empty every queue of the session's vhost (left-overs of an earlier test)."""
    declare_queues()
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        for name in ALL_QUEUES:
            channel.queue_purge(queue=name)


def close_broker_connections(reason: str) -> int:
    """``rabbitmqctl close_all_connections`` on this session's vhost; how many it closed."""
    done = subprocess.run(
        [
            "rabbitmqctl",
            "close_all_connections",
            "--vhost",
            session_env.VHOST,
            "--limit",
            "100000",
            reason,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    match = re.search(r"Closed (\d+) connections", done.stdout)
    return int(match.group(1)) if match else 0


def publish_raw(messages: Iterable[tuple[bytes, str, dict[str, Any], str]]) -> int:
    """Publish ``(body, content type, headers, queue)`` straight to the work queues, bypassing
    the service (malformed messages); how many were published."""
    published = 0
    with app.connection_for_write() as conn:
        producer = Producer(conn.default_channel)
        for body, content_type, headers, queue in messages:
            producer.publish(
                body,
                content_type=content_type,
                content_encoding="utf-8",
                headers=headers,
                exchange=messaging.TASKS_EXCHANGE,
                routing_key=queue,
                retry=True,
            )
            published += 1
    return published


def celery_message(
    kwargs: dict[str, Any], *, task: str | None, message_id: str | None
) -> tuple[bytes, dict[str, Any]]:
    """A protocol 2 message body and headers, with any field left out on purpose."""
    headers: dict[str, Any] = {"lang": "py", "argsrepr": "()", "kwargsrepr": "{}"}
    if task is not None:
        headers["task"] = task
    if message_id is not None:
        headers["id"] = message_id
        headers["root_id"] = message_id
    body = json.dumps(
        [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    return body.encode(), headers


# --- PostgreSQL: the session's own database only -----------------------------------------------


def terminate_backends() -> int:
    """Terminate every other backend connected to this test database; how many."""
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        return int(cursor.fetchone()[0])


def elapsed_since(started: float) -> float:
    return round(time.monotonic() - started, 1)
