"""The http.request group under ``-P threads`` (the former deployment, still supported; the
shipped one is prefork with the in-process pool): a SIGKILLed worker's tasks come back after
one lease, and the task's timeout_s still bounds a request."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks_app.http.testing import LoopbackServer, Reply
from tasks_app.models import FailureClass, Task, TaskLog, TaskStatus
from tests import session_env
from tests.conftest import Proc, service_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TERMINAL = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


@pytest.fixture
def server(settings) -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        settings.QW_HTTP_ALLOWED_HOSTS = [srv.netloc]
        yield srv


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start a ``-P threads`` worker on http.request, or beat; all stopped at the test's end."""
    started: list[Proc] = []

    def run(kind: str, **env: str) -> Proc:
        name = f"{kind}{len(started)}"
        celery = [sys.executable, "-m", "celery", "-A", "queueworker"]
        if kind == "worker":
            argv = [*celery, "worker", "-Q", "http.request", "-P", "threads", "-c", "16"]
            argv += ["-n", f"{name}-{session_env.SESSION}@%h", "--without-mingle"]
            argv += ["--without-gossip", "-l", "INFO"]
            ready = "ready."
        else:
            argv = [*celery, "beat", "-l", "INFO", "-s", str(tmp_path / "beat-schedule")]
            argv += ["--max-interval", "1"]
            ready = "beat: Starting..."
        proc = Proc(name, argv, service_env(**env), tmp_path / f"{name}.log")
        started.append(proc)
        proc.wait_for_output(ready)
        return proc

    yield run
    for proc in started:
        proc.stop()


def _create(api: Any, payload: dict[str, Any], **extra: Any) -> str:
    body = {"type": "HTTP_REQUEST", "payload": payload, **extra}
    response = api.post("/api/tasks/", body, format="json")
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def test_a_killed_threads_worker_loses_no_task_and_completes_none_twice(api, server, start):
    # given a threads worker with eight slow requests in flight, at the default lease (30 s)
    env = {"QW_HTTP_ALLOWED_HOSTS": server.netloc, "QW_LEASE_SECONDS": "30"}
    server.script("/slow", [Reply(delay_s=30)] * 8 + [Reply(json={"ok": True})])
    first = start("worker", **env)
    ids = [_create(api, {"url": server.url("/slow")}, timeout_s=60) for _ in range(8)]
    wait_for(lambda: len(server.received("/slow")) == 8, timeout=30)
    holders = set(Task.objects.filter(pk__in=ids).values_list("holder", flat=True))
    assert len(holders) == 1 and None not in holders  # the worker process holds them all

    # when it is SIGKILLed
    first.kill()
    killed = time.monotonic()
    start("worker", **env)
    start("beat", QW_LEASE_SECONDS="30")

    # then every task is COMPLETED within 60 s, and completed once
    wait_for(
        lambda: all(
            t in TERMINAL for t in Task.objects.filter(pk__in=ids).values_list("status", flat=True)
        ),
        timeout=75,
        interval=0.5,
    )
    assert time.monotonic() - killed < 60
    for task in Task.objects.filter(pk__in=ids):
        assert task.status == TaskStatus.COMPLETED, task.error
        assert task.attempt == 2
        assert TaskLog.objects.filter(task_id=task.id, event="completed").count() == 1


def test_a_trickling_server_is_cut_off_at_the_tasks_timeout(api, server, start):
    # given a server that sends its body one byte every 0.2 s, forever
    server.script("/trickle", Reply(trickle_s=0.2))
    start("worker", QW_HTTP_ALLOWED_HOSTS=server.netloc)
    task_id = _create(api, {"url": server.url("/trickle")}, timeout_s=2, max_retries=0)

    # then the task fails as a timeout at its own timeout_s, with no Celery time limit to help
    wait_for(lambda: Task.objects.get(pk=task_id).status in TERMINAL, timeout=20, interval=0.1)
    task = Task.objects.get(pk=task_id)
    assert task.status == TaskStatus.FAILED
    assert task.failure_class == FailureClass.TIMEOUT
    assert task.error == "timed out after 2s"
    assert task.started_at is not None and task.finished_at is not None
    assert (task.finished_at - task.started_at).total_seconds() < 3.5
