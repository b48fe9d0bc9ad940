#!/usr/bin/env python3
"""The container's health check: one image runs four processes, so look at PID 1 first.

- web (gunicorn): ``GET /api/health/live/`` on ``QW_BIND``'s port answers 200;
- worker (``celery worker``): the worker answers a Celery ping addressed to this host;
- flower: ``GET /healthcheck`` on ``FLOWER_PORT`` answers 200;
- beat, or anything else: PID 1 runs, which is all there is to check.

Exit status 0 is healthy, 1 unhealthy (Docker's ``HEALTHCHECK`` and a Kubernetes exec probe).
The web check sends a ``Host`` that ``DJANGO_ALLOWED_HOSTS`` accepts: Django answers any other
with 400.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

HTTP_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 5.0


def pid1_argv(proc: Path = Path("/proc/1/cmdline")) -> list[str]:
    return [arg.decode() for arg in proc.read_bytes().split(b"\0") if arg]


def process_of(argv: Sequence[str]) -> str:
    """``web``, ``worker``, ``beat``, ``flower`` or ``other`` for a command line."""
    names = [Path(arg).name for arg in argv]
    if any(name.startswith("gunicorn") for name in names):
        return "web"
    if "celery" in names:
        rest = names[names.index("celery") + 1 :]
        for process in ("worker", "beat", "flower"):
            if process in rest:
                return process
    return "other"


def host_header(environ: Mapping[str, str]) -> str:
    """A host that Django's ALLOWED_HOSTS accepts (its default list starts with localhost)."""
    hosts = [h.strip() for h in environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    if not hosts or hosts[0] == "*":
        return "localhost"
    return hosts[0].removeprefix(".")  # ".example.com" matches example.com itself


def port_of(bind: str, default: int) -> int:
    _, _, port = bind.rpartition(":")
    return int(port) if port.isdigit() else default


def http_ok(url: str, host: str | None = None, timeout: float = HTTP_TIMEOUT_S) -> bool:
    request = urllib.request.Request(url)  # noqa: S310  # a fixed http://127.0.0.1 URL
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_web(environ: Mapping[str, str]) -> bool:
    port = port_of(environ.get("QW_BIND", "0.0.0.0:8000"), 8000)
    return http_ok(f"http://127.0.0.1:{port}/api/health/live/", host_header(environ))


def check_flower(environ: Mapping[str, str]) -> bool:
    port = port_of(environ.get("FLOWER_PORT", "5555"), 5555)
    return http_ok(f"http://127.0.0.1:{port}/healthcheck")


def check_worker(environ: Mapping[str, str]) -> bool:
    """The worker named ``celery@<hostname>`` (Celery's default) answers a ping."""
    from queueworker.celery import app  # the project's broker settings, no django.setup()

    node = f"celery@{socket.gethostname()}"
    replies = app.control.ping(destination=[node], timeout=PING_TIMEOUT_S)
    return any(node in reply for reply in replies or [])


CHECKS = {"web": check_web, "worker": check_worker, "flower": check_flower}


def main() -> int:
    process = process_of(pid1_argv())
    check = CHECKS.get(process)
    if check is None:
        return 0
    try:
        healthy = check(os.environ)
    except Exception as exc:  # any failure to check is unhealthy, with the reason
        print(f"{process}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not healthy:
        print(f"{process}: unhealthy", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
