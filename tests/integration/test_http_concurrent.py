"""HTTP_REQUEST tasks of one message run several at a time in one worker process
(``QW_HTTP_CONCURRENCY``, ``tasks_app.concurrent``), on a real worker against a loopback server."""

from __future__ import annotations

from typing import Any

import pytest

from tasks_app.http.testing import LoopbackServer, Reply
from tasks_app.models import Task, TaskLog, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

S = TaskStatus
SLOW_S = 0.5


@pytest.fixture
def server(settings: Any) -> Any:
    with LoopbackServer() as srv:
        settings.QW_HTTP_ALLOWED_HOSTS = [srv.netloc]  # the create-time check, in this process
        srv.script("/slow", Reply(json={"ok": True}, delay_s=SLOW_S))
        yield srv


def _bulk(api: Any, url: str, n: int) -> list[str]:
    body = {"tasks": [{"type": "HTTP_REQUEST", "payload": {"url": url}}] * n}
    response = api.post("/api/tasks/bulk/", body, format="json")
    assert response.status_code == 201, response.content
    ids: list[str] = response.json()["ids"]
    return ids


def _settled(ids: list[str]) -> bool:
    return Task.objects.filter(id__in=ids, status__in=(S.COMPLETED, S.CANCELLED)).count() == len(
        ids
    )


def _keys(server: LoopbackServer) -> list[str]:
    return [r.header("Idempotency-Key") or "" for r in server.received("/slow")]


def test_slow_requests_of_one_bulk_create_run_together_in_one_process(spawn, api, server):
    # given one worker process that runs up to 16 HTTP requests at once
    spawn("worker", concurrency=1, QW_HTTP_ALLOWED_HOSTS=server.netloc, QW_HTTP_CONCURRENCY="16")

    # when 12 requests that each take 0.5 s are created in one bulk call (one message)
    ids = _bulk(api, server.url("/slow"), 12)
    wait_for(lambda: _settled(ids), timeout=30, interval=0.05)

    # then each completed exactly once, at its first attempt
    tasks = list(Task.objects.filter(id__in=ids))
    assert {(t.status, t.attempt) for t in tasks} == {(S.COMPLETED, 1)}
    assert sorted(_keys(server)) == sorted(f"qw-{i}" for i in ids)
    for task_id in ids:
        events = list(TaskLog.objects.filter(task_id=task_id).values_list("event", flat=True))
        assert events.count("completed") == 1, events
    # and they overlapped: the claims come in sub-batches (4, then 8), so two rounds of 0.5 s,
    # where one after another would take 6 s
    arrivals = sorted(r.at for r in server.received("/slow"))
    assert arrivals[-1] - arrivals[0] < 3 * SLOW_S
    finished = [t.finished_at for t in tasks if t.finished_at is not None]
    assert (max(finished) - min(t.started_at for t in tasks if t.started_at)).total_seconds() < (
        4 * SLOW_S
    )


def test_a_cancel_requested_while_a_task_waits_for_a_thread_cancels_it_before_it_starts(
    spawn, api, server
):
    # given a worker process that runs two HTTP requests at a time, and four slow ones in one
    # message (the first claim takes four: two run, two wait for a thread)
    spawn("worker", concurrency=1, QW_HTTP_ALLOWED_HOSTS=server.netloc, QW_HTTP_CONCURRENCY="2")
    ids = _bulk(api, server.url("/slow"), 4)
    wait_for(lambda: len(server.received("/slow")) >= 2, timeout=30, interval=0.02)
    started = set(_keys(server))
    waiting = [i for i in ids if f"qw-{i}" not in started]
    assert len(waiting) == 2
    assert Task.objects.get(id=waiting[-1]).status == S.PROCESSING  # claimed, not started

    # when a cancel is requested for the last one while it waits
    assert api.post(f"/api/tasks/{waiting[-1]}/cancel/").status_code in (200, 202)

    # then it is cancelled without its request being sent; the others complete once each
    wait_for(lambda: _settled(ids), timeout=30, interval=0.05)
    assert Task.objects.get(id=waiting[-1]).status == S.CANCELLED
    assert f"qw-{waiting[-1]}" not in _keys(server)
    others = [i for i in ids if i != waiting[-1]]
    assert sorted(_keys(server)) == sorted(f"qw-{i}" for i in others)
    assert Task.objects.filter(id__in=others, status=S.COMPLETED).count() == 3
