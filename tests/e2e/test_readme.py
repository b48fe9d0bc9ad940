"""The manual's commands work: ``make run`` on the embedded default runs the quick start.

The manual is README.md and docs/ (``tests.manual``): a command is checked wherever it lives.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import manual

ROOT = Path(__file__).resolve().parents[2]
MANUAL = manual.text()

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bash_blocks() -> list[str]:
    """The bash blocks not run verbatim by the quick-start test (those are checked by running)."""
    return re.findall(r"(?<!-->\n)```bash\n(.*?)```", MANUAL, flags=re.S)


def _quickstart(name: str = "quickstart") -> str:
    blocks = re.findall(rf"<!-- readme-test: {name} -->\n```bash\n(.*?)```", MANUAL, flags=re.S)
    assert blocks, f"the manual lost its {name} block"
    # a block shown on several pages (README.md and docs/quickstart.md) is the same everywhere
    assert len(set(blocks)) == 1, f"the copies of the {name} block differ"
    return blocks[0]


def _embedded_env(tmp_path: Path, bind: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QW_", "DATABASE_URL", "CELERY_", "DJANGO_"))
    }
    env.update(
        QW_VAR_DIR=str(tmp_path / "var"),
        QW_BIND=bind,
        FLOWER_PORT=str(_free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Token {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def test_make_run_serves_the_quick_start_on_the_embedded_default(tmp_path):
    # given `make run` with nothing configured (SQLite + filesystem broker)
    bind = f"127.0.0.1:{_free_port()}"
    env = _embedded_env(tmp_path, bind)
    log = (tmp_path / "make-run.log").open("wb")
    run = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while _get(f"http://{bind}/api/health/live/")[0] != 200:
            assert run.poll() is None, (tmp_path / "make-run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "make run did not come up"
            time.sleep(0.5)
        output = (tmp_path / "make-run.log").read_text()
        assert "QueueWorker — embedded demo mode" in output
        assert "/api/docs/" in output

        # when the README's quick start runs in a second terminal
        script = (_quickstart() + _quickstart("data")).replace("127.0.0.1:8000", bind)
        script += '\necho\necho "TOKEN=$TOKEN"\necho "TASK=$TASK"\necho "DATA=$DATA"\n'
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

        # then the task it submitted completes, with the result and log the README promises
        token = re.search(r"^TOKEN=(\w+)$", done.stdout, flags=re.M).group(1)
        task_id = re.search(r"^TASK=([0-9a-f-]{36})$", done.stdout, flags=re.M).group(1)
        assert f'"id":"{task_id}"' in done.stdout
        task: dict = {}
        deadline = time.monotonic() + 30
        while task.get("status") != "COMPLETED":
            assert time.monotonic() < deadline, task
            time.sleep(0.2)
            status, body = _get(f"http://{bind}/api/tasks/{task_id}/", token)
            task = json.loads(body) if status == 200 else {}
        assert task["result"] == {"ok": True, "attempt": 1, "result": "hello"}
        _, body = _get(f"http://{bind}/api/tasks/{task_id}/logs/", token)
        assert [row["event"] for row in json.loads(body)] == ["created", "started", "completed"]
        # and the DATA_PROCESSING example ran its two batches as a chord, here too
        data_id = re.search(r"^DATA=([0-9a-f-]{36})$", done.stdout, flags=re.M).group(1)
        deadline = time.monotonic() + 30
        while (status_body := _get(f"http://{bind}/api/tasks/{data_id}/result/", token))[0] != 200:
            assert time.monotonic() < deadline, status_body
            time.sleep(0.2)
        result = json.loads(status_body[1])
        assert result["rows"] == [
            {"country": "UK", "people": 1, "total": 12.5},
            {"country": "SE", "people": 1, "total": 7.0},
        ]
        assert (result["stats"]["invalid"], result["stats"]["batches"]) == (1, 2)
        assert "n/a" in json.dumps(result["invalid_samples"])
        # and the other pages it names answer
        assert _get(f"http://{bind}/api/docs/")[0] == 200
        assert _get(f"http://{bind}/admin/login/")[0] == 200
        assert _get(f"http://{bind}/static/admin/css/base.css")[0] == 200
    finally:
        try:
            os.killpg(run.pid, signal.SIGTERM)
            run.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(run.pid, signal.SIGKILL)
        log.close()


def _commands() -> list[list[str]]:
    commands = []
    for block in _bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def test_every_other_readme_command_names_a_real_target_or_subcommand():
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    checked = 0
    for argv in _commands():
        words = [w for w in argv if "=" not in w or w.startswith("-")]  # drop VAR=value prefixes
        if not words or words[0] in ("curl", "sleep", "TASK", "TOKEN"):
            continue
        program = Path(words[0]).name
        if program == "make":
            target = words[1] if len(words) > 1 else "all"
            result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True)
        elif program.startswith("python") and words[1:2] == ["manage.py"]:
            result = subprocess.run(
                [python, "manage.py", "help", words[2]], cwd=ROOT, capture_output=True
            )
        elif program == "celery":
            result = subprocess.run(
                [python, "-m", "celery", "-A", "queueworker", words[3], "--help"],
                cwd=ROOT,
                capture_output=True,
            )
        elif program == "createdb":
            continue  # PostgreSQL's own client, shown for the server setup
        else:
            continue
        assert result.returncode == 0, f"manual command fails: {' '.join(argv)}\n{result.stderr!r}"
        checked += 1
    assert checked >= 6


def test_readme_workflow_definition_example_is_valid():
    from workflows_app.definition import validate

    examples = [
        block
        for block in re.findall(r"```json\n(.*?)```", MANUAL, flags=re.S)
        if block.lstrip().startswith('{"start"')
    ]
    assert examples, "the manual lost its workflow definition example"
    for example in examples:
        graph = validate(json.loads(example))
        assert graph.start in graph.steps
