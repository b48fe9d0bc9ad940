"""Real processes: JSON log lines from worker and beat, the request id in a task's worker lines,
and Flower behind basic auth."""

from __future__ import annotations

import base64
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks_app.models import Task, TaskStatus
from tests.conftest import Proc, service_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line the process printed, each parsed as JSON (a line that is not JSON fails)."""
    entries = []
    for number, line in enumerate(proc.output().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{proc.name} line {number} is not JSON: {line!r}\n{proc.output()[-3000:]}")
        assert isinstance(entry, dict), line
        assert {"timestamp", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def test_worker_prints_only_json_and_a_tasks_lines_carry_its_request_id(api, spawn):
    # given a worker logging JSON
    worker = spawn("worker", LOG_FORMAT="json")

    # when a task is created by a request with an id of its own
    response = api.post(
        "/api/tasks/",
        {"type": "NOOP", "payload": {"sleep_ms": 10}},
        format="json",
        HTTP_X_REQUEST_ID="abc-123",
    )
    assert response.status_code == 201, response.content
    task_id = response.json()["id"]
    wait_for(lambda: Task.objects.get(pk=task_id).status == TaskStatus.COMPLETED)

    # then every line the worker printed is a JSON object, and the task's carry its context
    def finished() -> list[dict[str, Any]]:
        return [e for e in _json_lines(worker) if e.get("outcome") and e.get("task_id") == task_id]

    [line] = wait_for(finished, timeout=10)
    assert line["request_id"] == "abc-123"
    assert line["type"] == "NOOP"
    assert line["attempt"] == 1
    assert line["outcome"] == "completed"
    assert line["level"] == "INFO"
    assert line["logger"] == "tasks_app.tasks"
    assert isinstance(line["duration_ms"], int | float)
    assert any("ready." in e["message"] for e in _json_lines(worker))


def test_beat_prints_only_json(spawn):
    beat = spawn("beat", LOG_FORMAT="json")
    time.sleep(1.5)  # a few ticks of the dispatcher and the sweep (QW_DISPATCH_INTERVAL_S 1)

    # its start-up banner included
    entries = _json_lines(beat)
    assert entries[0]["message"].startswith("celery beat v")
    assert any(e["message"] == "beat: Starting..." for e in entries)
    assert beat.popen.poll() is None


# --- Flower ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(url: str, credentials: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[str]:
    """``celery flower`` on a free loopback port with basic auth ``u:p``; its base URL."""
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "queueworker",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        "--basic-auth=u:p",
    ]
    proc = Proc("flower", argv, service_env(), tmp_path / "flower.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def listening() -> bool:
            assert proc.popen.poll() is None, f"flower exited:\n{proc.output()[-3000:]}"
            return _status(f"{url}/") != 0

        wait_for(listening, timeout=30, interval=0.2)
        yield url
    finally:
        proc.stop()


def test_flower_answers_only_with_its_basic_auth(flower):
    assert _status(f"{flower}/") == 401
    assert _status(f"{flower}/", "u:wrong") == 401
    assert _status(f"{flower}/", "u:p") == 200
    assert _status(f"{flower}/api/workers", "u:p") == 200
