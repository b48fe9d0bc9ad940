"""Fault 5: malformed messages published straight to the work queues.

Each kind (not JSON, a pickle, a bare JSON object or string instead of Celery's envelope, an
unknown task name, no task header, no message id, no ``taskId`` or a bad one, the id of no task)
is either rejected to ``tasks.dead_letter`` and recorded, or dropped with a log line at WARNING
or above that names it; no worker process crashes, and a task queued behind them is not
delayed.
"""

from __future__ import annotations

import json
import pickle
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tasks_app.dispatch import EXECUTE_TASK
from tasks_app.models import DeadLetterMessage, Task, TaskStatus
from tests.chaos import harness, invariants, report, workload
from tests.chaos.harness import SERVICE_ENV, WORK_QUEUES, scaled

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PER_KIND = scaled(30, minimum=3)
TASKS = scaled(1000, minimum=100)
DELAY_S = 3.0  # a task queued behind all the malformed ones must be done within this
WINDOW_S = 60 + TASKS / 25


@dataclass(frozen=True)
class Kind:
    name: str
    build: Callable[[str], tuple[bytes, str, dict]]  # marker -> body, content type, headers


def _json(kwargs: dict, *, task: str | None = EXECUTE_TASK, with_id: bool = True):
    def build(marker: str) -> tuple[bytes, str, dict]:
        body, headers = harness.celery_message(
            {**kwargs, "metadata": {"marker": marker}},
            task=task,
            message_id=marker if with_id else None,
        )
        return body, "application/json", headers

    return build


def _not_json(marker: str) -> tuple[bytes, str, dict]:
    return (
        f"{{broken json {marker}".encode(),
        "application/json",
        {"task": EXECUTE_TASK, "id": marker},
    )


def _plain_text(marker: str) -> tuple[bytes, str, dict]:
    return f"hello {marker}".encode(), "text/plain", {"task": EXECUTE_TASK, "id": marker}


def _bare_object(marker: str) -> tuple[bytes, str, dict]:
    """The contract's fields as a bare JSON object, without Celery's [args, kwargs, embed]."""
    body = json.dumps({"taskType": "NOOP", "taskId": marker, "delay": 0, "metadata": {}})
    return body.encode(), "application/json", {"task": EXECUTE_TASK, "id": marker}


def _json_scalar(marker: str) -> tuple[bytes, str, dict]:
    return (
        json.dumps(f"args {marker}").encode(),
        "application/json",
        {"task": EXECUTE_TASK, "id": marker},
    )


def _pickle(marker: str) -> tuple[bytes, str, dict]:
    body = pickle.dumps(([], {"taskType": "NOOP", "taskId": marker}, {}))
    return body, "application/x-python-serialize", {"task": EXECUTE_TASK, "id": marker}


KINDS = [
    Kind("not JSON (broken JSON)", _not_json),
    Kind("not JSON (text/plain)", _plain_text),
    Kind("pickle body", _pickle),
    Kind("bare JSON object", _bare_object),
    Kind("JSON string body", _json_scalar),
    Kind(
        "unknown task name",
        _json({"taskType": "NOOP", "taskId": str(uuid.uuid4())}, task="no.such.task"),
    ),
    Kind("no taskId", _json({"taskType": "NOOP"})),
    Kind("taskId not a UUID", _json({"taskType": "NOOP", "taskId": "42"})),
    Kind("id of no task", _json({"taskType": "NOOP", "taskId": "{marker_uuid}"})),
    Kind("no message id", _json({"taskType": "NOOP", "taskId": str(uuid.uuid4())}, with_id=False)),
    Kind("no task header", _json({"taskType": "NOOP", "taskId": str(uuid.uuid4())}, task=None)),
]


def _publish_all() -> dict[str, str]:
    """Publish PER_KIND messages of every kind, round robin over the work queues."""
    markers: dict[str, str] = {}
    messages = []
    for n in range(PER_KIND * len(KINDS)):
        kind = KINDS[n % len(KINDS)]
        marker = str(uuid.uuid4())
        body, content_type, headers = kind.build(marker)
        body = body.replace(b"{marker_uuid}", marker.encode())
        messages.append((body, content_type, headers, WORK_QUEUES[n % len(WORK_QUEUES)]))
        markers[marker] = kind.name
    assert harness.publish_raw(messages) == len(markers)
    return markers


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LOUD = re.compile(r" (WARNING|ERROR|CRITICAL) ")


def _fates(markers: dict[str, str], logs: str) -> dict[str, dict[str, int]]:
    """Per kind: how many were recorded as dead letters, dropped with a log line at WARNING
    or above that names them, or neither."""
    recorded = set()
    for entry in DeadLetterMessage.objects.all():
        recorded.update(UUID.findall(entry.body_excerpt))
        recorded.add(str(entry.headers.get("id", "")))
    logged = {m for line in logs.splitlines() if LOUD.search(line) for m in UUID.findall(line)}
    fates: dict[str, dict[str, int]] = {kind.name: {} for kind in KINDS}
    for marker, kind in markers.items():
        if marker in recorded:
            fate = "dead-lettered"
        elif marker in logged:
            fate = "dropped with a log line"
        else:
            fate = "unaccounted"
        fates[kind][fate] = fates[kind].get(fate, 0) + 1
    return fates


@pytest.mark.timeout(int(WINDOW_S + 240))
def test_malformed_messages_are_refused_and_delay_nothing(api, spawn):
    started = time.monotonic()
    # given two workers and beat, and their pool processes
    workers = [spawn("worker", **SERVICE_ENV), spawn("worker", **SERVICE_ENV)]
    spawn("beat", **SERVICE_ENV)
    pools = [set(w.children()) for w in workers]

    # when malformed messages of every kind reach the work queues, with real work behind them
    markers = _publish_all()
    probe = api.post("/api/tasks/", workload.noop_task(), format="json").json()["id"]
    accepted = [probe, *workload.submit_bulk(api, [workload.noop_task(5) for _ in range(TASKS)])]

    # then the real work completes, the task right behind them without delay
    found = invariants.settle_and_check(WINDOW_S, accepted=accepted)
    problems = []
    if found.by_status != {TaskStatus.COMPLETED: TASKS + 1}:
        problems.append(f"not all completed: {found.by_status}")
    first = Task.objects.get(pk=probe)
    probe_s = round((first.finished_at - first.created_at).total_seconds(), 2)
    if probe_s > DELAY_S:
        problems.append(f"the task queued behind them took {probe_s} s (> {DELAY_S} s)")
    # and each malformed message was dead-lettered or dropped with a log line naming it
    # (the dead-letter consumer records what it took off the queue: give it a moment)
    deadline = time.monotonic() + 15
    while True:
        fates = _fates(markers, "".join(w.output() for w in workers))
        if time.monotonic() > deadline or not any("unaccounted" in f for f in fates.values()):
            break
        time.sleep(0.5)
    unaccounted = {kind: f["unaccounted"] for kind, f in fates.items() if f.get("unaccounted")}
    if unaccounted:
        problems.append(f"malformed messages neither dead-lettered nor logged: {unaccounted}")
    # and no worker or pool process crashed
    if any(w.popen.poll() is not None for w in workers):
        problems.append("a worker's main process died")
    if [set(w.children()) for w in workers] != pools:
        problems.append("a pool process was replaced (it crashed)")
    report.record(
        "5 malformed messages",
        found,
        injected=len(markers),
        detail=f"{PER_KIND} each of {len(KINDS)} kinds published straight to the work queues, "
        f"{TASKS + 1:,} real tasks behind them",
        wall_s=harness.elapsed_since(started),
        extra={
            **{
                kind: ", ".join(f"{n} {fate}" for fate, n in sorted(f.items()))
                for kind, f in fates.items()
            },
            "task queued right behind them, create → completed s": probe_s,
        },
        problems=problems,
    )
    found.assert_ok()
    assert not problems, problems
