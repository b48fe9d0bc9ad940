"""HTTP_REQUEST tasks on a real worker against a loopback HTTP server in the test process."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from django.conf import settings as django_settings
from django.db import connection, transaction
from kombu import Connection, Exchange, Queue

from tasks_app.http.testing import Listener, LoopbackServer, Received, Reply
from tasks_app.models import Task, TaskLog, TaskStatus
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PLANTED = "planted-Qx7-secret-value"
TERMINAL = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


@pytest.fixture
def server(settings) -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        settings.QW_HTTP_ALLOWED_HOSTS = [srv.netloc]  # the create-time check, in this process
        yield srv


@pytest.fixture
def http_worker(spawn, server):
    return spawn(
        "worker",
        QW_HTTP_ALLOWED_HOSTS=server.netloc,
        QW_SECRET_PLANTED=PLANTED,
        QW_SECRET_PLANTED_HOSTS=server.netloc,
    )


def _create(api, payload: dict[str, Any], **extra: Any) -> str:
    body = {"type": "HTTP_REQUEST", "payload": payload, **extra}
    response = api.post("/api/tasks/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _task(task_id: str) -> Task:
    return Task.objects.get(pk=task_id)


def _finished(*task_ids: str, timeout: float = 30) -> list[Task]:
    wait_for(
        lambda: all(_task(t).status in TERMINAL for t in task_ids), timeout=timeout, interval=0.1
    )
    return [_task(t) for t in task_ids]


def _events(task_id: str) -> list[str]:
    return list(TaskLog.objects.filter(task_id=task_id).values_list("event", flat=True))


# --- requests and outcomes ---------------------------------------------------------------------


def test_every_method_with_headers_params_json_and_body(api, server, http_worker):
    # given one task per method, with headers, params and a JSON or a raw body
    ids = {}
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]:
        payload: dict[str, Any] = {
            "url": server.url(f"/m/{method}"),
            "method": method,
            "headers": {"X-Case": method.lower()},
            "params": {"case": method, "n": 2},
        }
        if method in ("POST", "PATCH"):
            payload["json"] = {"method": method}
        elif method in ("PUT", "DELETE"):
            payload.update(
                body=f"raw {method}", headers={"X-Case": "raw", "Content-Type": "text/plain"}
            )
        ids[method] = _create(api, payload)

    # when the worker runs them
    tasks = dict(zip(ids, _finished(*ids.values()), strict=True))

    # then each reached the server as asked, and its result is the response
    for method, task in tasks.items():
        assert task.status == TaskStatus.COMPLETED, (method, task.error)
        received = server.received(f"/m/{method}")[0]
        assert received.method == method
        assert received.query == {"case": [method], "n": ["2"]}
        assert task.result["status_code"] == 200
    assert server.received("/m/POST")[0].json() == {"method": "POST"}
    assert server.received("/m/PATCH")[0].json() == {"method": "PATCH"}
    assert server.received("/m/PUT")[0].body == b"raw PUT"
    assert server.received("/m/DELETE")[0].header("Content-Type") == "text/plain"
    assert server.received("/m/GET")[0].header("X-Case") == "get"
    assert tasks["GET"].result["json"]["headers"]["X-Case"] == "get"
    assert tasks["HEAD"].result["text"] == ""
    detail = api.get(f"/api/tasks/{ids['POST']}/").json()
    assert detail["result"]["json"]["method"] == "POST"


def test_503_twice_then_success_with_growing_gaps_and_one_idempotency_key(api, server, http_worker):
    # given a server that answers 503 twice, then 200
    server.script("/flaky", [Reply(503), Reply(503), Reply(json={"ok": True})])
    task_id = _create(
        api,
        {"url": server.url("/flaky"), "method": "POST", "json": {"n": 1}},
        retry_backoff_s=0.3,
        retry_jitter=False,
    )

    # when the worker runs it
    (task,) = _finished(task_id)

    # then it retried twice, each wait longer than the last, with the same Idempotency-Key
    assert task.status == TaskStatus.COMPLETED and task.result["json"] == {"ok": True}
    assert task.retries == 2
    seen = server.received("/flaky")
    assert len(seen) == 3
    first_gap, second_gap = seen[1].at - seen[0].at, seen[2].at - seen[1].at
    assert 0.3 <= first_gap < second_gap and second_gap >= 0.6
    keys = {r.header("Idempotency-Key") for r in seen}
    assert keys == {f"qw-{task_id}"}
    delays = [
        log.data["delay_s"]
        for log in TaskLog.objects.filter(task_id=task_id, event="retry_scheduled")
    ]
    assert delays == [0.3, 0.6]


def test_404_fails_at_once_without_retry(api, server, http_worker):
    server.script("/gone", Reply(404, body="widget 7 does not exist"))
    task_id = _create(api, {"url": server.url("/gone")})

    (task,) = _finished(task_id)

    assert task.status == TaskStatus.FAILED and task.failure_class == "non_retryable"
    assert (
        task.error == f"HTTP 404 Not Found from GET {server.url('/gone')}: widget 7 does not exist"
    )
    assert task.retries == 0 and len(server.received("/gone")) == 1
    assert _events(task_id) == ["created", "started", "failed"]


def test_retry_after_is_honoured_and_capped_by_the_backoff_maximum(api, server, http_worker):
    # given one server asking for 2 s, another for 30 s on a task whose backoff cap is 1 s
    server.script("/wait2", [Reply(429, headers={"Retry-After": "2"}), Reply()])
    server.script("/wait30", [Reply(503, headers={"Retry-After": "30"}), Reply()])
    honoured = _create(api, {"url": server.url("/wait2")}, retry_backoff_s=0.05, retry_jitter=False)
    capped = _create(
        api, {"url": server.url("/wait30")}, retry_backoff_s=0.05, retry_backoff_max_s=1
    )

    _finished(honoured, capped)

    def gap(path: str) -> float:
        first, second = server.received(path)
        return second.at - first.at

    assert 2.0 <= gap("/wait2") < 3.5
    assert 1.0 <= gap("/wait30") < 2.5
    delays = {
        log.task_id: log.data["delay_s"] for log in TaskLog.objects.filter(event="retry_scheduled")
    }
    assert delays == {uuid.UUID(honoured): 2.0, uuid.UUID(capped): 1.0}


def test_a_read_timeout_is_retried(api, server, http_worker):
    server.script("/slow", [Reply(delay_s=2), Reply(json={"late": False})])
    task_id = _create(api, {"url": server.url("/slow"), "timeout_s": 0.5}, retry_backoff_s=0.1)

    (task,) = _finished(task_id)

    assert task.status == TaskStatus.COMPLETED and task.result["json"] == {"late": False}
    retry = TaskLog.objects.get(task_id=task_id, event="retry_scheduled")
    assert f"GET {server.url('/slow')}: read timeout after 0.5s" in retry.message


def test_a_redirect_chain_is_followed_and_capped(api, server, http_worker):
    for prefix, hops in (("/five", 5), ("/six", 6)):
        for i in range(hops):
            server.script(f"{prefix}{i}", Reply(302, headers={"Location": f"{prefix}{i + 1}"}))
        server.script(f"{prefix}{hops}", Reply(json={"hops": hops}))
    followed = _create(api, {"url": server.url("/five0")})
    too_many = _create(api, {"url": server.url("/six0")})

    ok, failed = _finished(followed, too_many)

    assert ok.status == TaskStatus.COMPLETED and ok.result["json"] == {"hops": 5}
    assert ok.result["redirects"] == 5 and ok.result["url"] == server.url("/five5")
    assert failed.status == TaskStatus.FAILED and failed.failure_class == "non_retryable"
    assert "more than 5 redirects" in failed.error
    assert not server.received("/six6")


def test_a_body_over_the_cap_is_truncated(api, server, http_worker):
    server.script("/big", Reply(headers={"Content-Type": "text/plain"}, body="z" * 3000))
    task_id = _create(api, {"url": server.url("/big"), "max_response_bytes": 1000})

    (task,) = _finished(task_id)

    assert task.status == TaskStatus.COMPLETED
    assert task.result["truncated"] is True and task.result["text"] == "z" * 1000


def test_connections_are_reused_across_tasks(api, server, http_worker):
    ids = [_create(api, {"url": server.url(f"/r{i}")}) for i in range(20)]
    tasks = _finished(*ids)
    assert all(t.status == TaskStatus.COMPLETED for t in tasks)
    assert len(server.received()) == 20
    assert server.connections <= 2  # one keep-alive connection per pool process


# --- the SSRF guard on the worker --------------------------------------------------------------


def test_refused_destinations_fail_without_retry_and_without_a_connection(
    api, server, spawn, monkeypatch
):
    with Listener("127.0.0.2") as refused, Listener("127.0.0.1") as local:
        # given a worker that allows only the server, and three ways to reach elsewhere
        inner = f"http://127.0.0.2:{refused.port}/secret-url"
        inner_hosts = f"127.0.0.2:{refused.port}"
        monkeypatch.setenv("QW_SECRET_INNER_URL_HOSTS", inner_hosts)  # checked at create
        spawn(
            "worker",
            QW_HTTP_ALLOWED_HOSTS=server.netloc,
            QW_SECRET_INNER_URL=inner,
            QW_SECRET_INNER_URL_HOSTS=inner_hosts,
        )
        server.script(
            "/bounce", Reply(302, headers={"Location": f"http://127.0.0.2:{refused.port}/"})
        )
        by_name = _create(api, {"url": f"http://localhost:{local.port}/"})
        by_redirect = _create(api, {"url": server.url("/bounce")})
        by_secret_url = _create(api, {"url": {"$secret": "INNER_URL"}})

        # when the worker runs them
        tasks = _finished(by_name, by_redirect, by_secret_url)

        # then each failed at once, and no connection reached either listener
        for task in tasks:
            assert task.status == TaskStatus.FAILED, task.error
            assert task.failure_class == "non_retryable" and task.retries == 0
            assert "refused to connect" in task.error
            assert _events(str(task.id)) == ["created", "started", "failed"]
        # a name's internal address is not shown; an address written in a URL is
        assert "localhost resolves to a private or reserved address" in tasks[0].error
        assert "127.0.0.1" not in tasks[0].error
        assert "127.0.0.2 is a loopback address" in tasks[1].error
        assert inner not in tasks[2].error
        assert len(server.received("/bounce")) == 1
        assert refused.accepted() == 0
        assert local.accepted() == 0


# --- secrets -----------------------------------------------------------------------------------


class Tap:
    """Every message published in the session's vhost, from RabbitMQ's firehose tracer.

    Wake-ups go out on the default exchange (Celery's route to a direct queue), so a queue
    bound beside ``http.request`` would see nothing; the firehose sees every publish, the
    worker's retries included.
    """

    def __init__(self) -> None:
        url = django_settings.CELERY_BROKER_URL
        self.vhost = url.rsplit("/", 1)[1]
        _rabbitmqctl("trace_on", "-p", self.vhost)
        self.conn = Connection(url)
        trace = Exchange("amq.rabbitmq.trace", type="topic", passive=True)
        self.queue = Queue(
            f"tap-{uuid.uuid4().hex[:8]}", trace, routing_key="publish.#", exclusive=True
        )(self.conn.default_channel)
        self.queue.declare()

    def drain(self) -> list[bytes]:
        bodies = []
        while (message := self.queue.get(no_ack=True)) is not None:
            body = message.body
            bodies.append(body if isinstance(body, bytes) else body.encode())
        return bodies

    def close(self) -> None:
        self.conn.release()
        _rabbitmqctl("trace_off", "-p", self.vhost)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def _echo_key(request: Received) -> str:
    return f"you sent {request.header('X-Api-Key')} and {request.header('Authorization')}"


def test_a_planted_secret_reaches_no_log_error_response_message_or_page(
    api, client, staff_user, server, spawn, monkeypatch
):
    tap = Tap()
    try:
        # given a worker holding the secret, and a server that echoes what it receives
        monkeypatch.setenv("QW_SECRET_PLANTED_HOSTS", server.netloc)  # checked at create
        proc = spawn(
            "worker",
            QW_HTTP_ALLOWED_HOSTS=server.netloc,
            QW_SECRET_PLANTED=PLANTED,
            QW_SECRET_PLANTED_HOSTS=server.netloc,
        )
        busy = iter([Reply(503, body="busy")])
        server.script("/fail", lambda r: Reply(404, body=_echo_key(r)))
        server.script("/busy", lambda r: next(busy, Reply(body=_echo_key(r))))
        secret = {"$secret": "PLANTED"}
        ok = _create(
            api,
            {
                "url": server.url("/echo"),
                "method": "POST",
                "headers": {"X-Api-Key": secret},
                "params": {"k": secret},
                "json": {"v": secret},
                "auth": {"type": "bearer", "token": secret},
            },
        )
        failed = _create(api, {"url": server.url("/fail"), "headers": {"X-Api-Key": secret}})
        retried = _create(
            api,
            {
                "url": server.url("/busy"),
                "method": "PUT",
                "auth": {"type": "basic", "username": "u", "password": secret},
            },
            retry_backoff_s=0.1,
        )

        # when they run
        tasks = _finished(ok, failed, retried)

        # then the server got the secret, and nothing anyone can read shows it
        assert [t.status for t in tasks] == ["COMPLETED", "FAILED", "COMPLETED"], [
            t.error for t in tasks
        ]
        assert server.received("/echo")[0].header("X-Api-Key") == PLANTED
        assert server.received("/echo")[0].header("Authorization") == f"Bearer {PLANTED}"
        client.force_login(staff_user)
        readable = {
            "task rows": json.dumps(list(Task.objects.values()), default=str),
            "log rows": json.dumps(list(TaskLog.objects.values()), default=str),
            "worker output": proc.output(),
            "broker messages": b"".join(tap.drain()).decode(errors="replace"),
        }
        for task_id in (ok, failed, retried):
            for path in (f"/api/tasks/{task_id}/", f"/api/tasks/{task_id}/logs/"):
                readable[path] = api.get(path).content.decode()
            page = f"/admin/tasks_app/task/{task_id}/change/"
            readable[page] = client.get(page).content.decode()
        readable["list"] = api.get("/api/tasks/").content.decode()
        readable["dead letters"] = api.get("/api/queues/dead-letter/").content.decode()
        readable["log admin"] = client.get("/admin/tasks_app/tasklog/").content.decode()
        for where, text in readable.items():
            assert PLANTED not in text, where
        assert "[REDACTED]" in _task(failed).error  # the echoed key was scrubbed, not dropped
        assert "[REDACTED]" in json.dumps(_task(ok).result)
        messages = readable["broker messages"]
        assert messages.count('"taskId"') >= 4  # three creates and one retry, all ids only
        assert '"payload"' not in messages
    finally:
        tap.close()


ENCODED = "enc Qx8/secret+value&x=1"  # a query string percent-encodes it


def test_a_secret_never_follows_a_redirect_to_another_origin_nor_shows_encoded(
    api, server, spawn, monkeypatch
):
    with LoopbackServer() as other:
        # given two servers, both allowed and both bound to the secrets, the first redirecting
        # a POST to the second with a 307 (which would resend its body)
        both = f"{server.netloc},{other.netloc}"
        monkeypatch.setenv("QW_SECRET_PLANTED_HOSTS", both)
        monkeypatch.setenv("QW_SECRET_ENCODED_HOSTS", both)
        proc = spawn(
            "worker",
            QW_HTTP_ALLOWED_HOSTS=both,
            QW_SECRET_PLANTED=PLANTED,
            QW_SECRET_PLANTED_HOSTS=both,
            QW_SECRET_ENCODED=ENCODED,
            QW_SECRET_ENCODED_HOSTS=both,
        )
        server.script("/away", Reply(307, headers={"Location": other.url("/landed")}))
        redirected = _create(
            api,
            {
                "url": server.url("/away"),
                "method": "POST",
                "headers": {"X-Api-Key": {"$secret": "PLANTED"}},
                "params": {"api_key": {"$secret": "ENCODED"}},
                "json": {"token": {"$secret": "PLANTED"}},
            },
        )
        in_query = _create(
            api,
            {
                "url": server.url("/query"),
                "method": "POST",
                "params": {"k": {"$secret": "ENCODED"}},
            },
        )

        # when the worker runs them
        failed, completed = _finished(redirected, in_query)

        # then the redirect is not followed: the task fails at once, the other origin sees nothing
        assert failed.status == TaskStatus.FAILED and failed.failure_class == "non_retryable"
        assert failed.retries == 0
        assert f"redirect to another origin (http://{other.netloc}) not followed" in failed.error
        assert "carries secrets PLANTED, ENCODED" in failed.error
        assert not other.requests
        assert len(server.received("/away")) == 1
    # and the secret in a query string went out, but no form of it is stored or logged
    assert completed.status == TaskStatus.COMPLETED, completed.error
    assert server.received("/query")[0].query == {"k": [ENCODED]}
    assert completed.result["url"] == server.url("/query?k=[REDACTED]")
    readable = json.dumps(
        [
            list(Task.objects.values("result", "error", "payload")),
            list(TaskLog.objects.values("message", "data")),
            proc.output(),
        ],
        default=str,
    )
    forms = {PLANTED, ENCODED, quote(ENCODED), quote_plus(ENCODED), quote(ENCODED, safe="")}
    for form in forms:
        assert form not in readable, form
    assert "[REDACTED]" in json.dumps(
        list(TaskLog.objects.filter(task_id=in_query, event="http_response").values("message"))
    )


# --- at most once ------------------------------------------------------------------------------


def test_a_recorded_response_is_not_requested_again_after_a_worker_crash(api, server, spawn):
    # given a POST whose response arrives while its worker cannot finish the task
    first = spawn("worker", concurrency=1, QW_HTTP_ALLOWED_HOSTS=server.netloc)
    arrived, release = threading.Event(), threading.Event()

    def charge(request: Received) -> Reply:
        arrived.set()
        release.wait(20)
        return Reply(201, json={"charge": "ch_1"})

    server.script("/charge", charge)
    task_id = _create(
        api, {"url": server.url("/charge"), "method": "POST", "json": {"cents": 500}}, timeout_s=10
    )
    assert arrived.wait(20)
    with transaction.atomic():
        # the completion waits on this row lock; the response's log row does not
        Task.objects.select_for_update(no_key=True).get(pk=task_id)
        release.set()
        wait_for(lambda: TaskLog.objects.filter(task_id=task_id, event="http_response").exists())
        wait_for(lambda: _blocked_backends(), timeout=10)

        # when the worker dies before it records the completion
        first.kill()
        with connection.cursor() as cursor:
            for pid in _blocked_backends():
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

    # then, once the lease expires, the next attempt replays the recorded response
    spawn("worker", QW_HTTP_ALLOWED_HOSTS=server.netloc)
    spawn("beat", QW_SWEEP_INTERVAL_S="0.3", QW_DISPATCH_INTERVAL_S="0.2")
    (task,) = _finished(task_id, timeout=40)
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.result["json"] == {"charge": "ch_1"} and task.result["status_code"] == 201
    assert len(server.received("/charge")) == 1
    events = _events(task_id)
    assert events.count("http_response") == 1 and "lease_expired" in events
    reused = TaskLog.objects.get(task_id=task_id, event="http_response_reused")
    assert reused.data["recorded_attempt"] == 1 and reused.data["attempt"] == 2


def _blocked_backends() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return [row[0] for row in cursor.fetchall()]
