"""The HTTP_REQUEST handler, called as a function against a loopback server in this process."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from tasks_app.errors import PermanentError, RetryableError
from tasks_app.handlers.http import http_request, recorded_response, retry_after, task_problems
from tasks_app.http import client
from tasks_app.http.testing import Listener, LoopbackServer, Reply
from tasks_app.models import TaskLog
from tasks_app.worker import TaskContext
from tests.unit._helpers import make_task


class FakeContext:
    """What a handler sees of its task, without a database row."""

    def __init__(self, attempt: int = 1, timeout_s: int = 30) -> None:
        self.task_id = uuid.uuid4()
        self.attempt = attempt
        self.retries = attempt - 1
        self.max_retries = 3
        self.timeout_s = timeout_s
        self.logs: list[tuple[str, str, dict[str, Any]]] = []

    def check_cancelled(self) -> None:
        pass

    def log(self, event: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.logs.append((event, message, data or {}))


@pytest.fixture
def server(settings):
    with LoopbackServer() as srv:
        settings.QW_HTTP_ALLOWED_HOSTS = [srv.netloc]
        yield srv


@pytest.fixture
def ctx():
    return FakeContext()


# --- requests as asked -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_every_method_sends_headers_params_and_json(server, ctx, method):
    result = http_request(
        ctx,
        {
            "url": server.url("/echo"),
            "method": method,
            "headers": {"X-Trace": "t-1", "Accept": "application/json"},
            "params": {"q": "a b", "n": 3, "flag": True, "many": ["x", "y"]},
            "json": {"name": "Ada", "tags": [1, 2]},
        },
    )

    received = server.received("/echo")[0]
    assert received.method == method
    assert received.header("X-Trace") == "t-1"
    assert received.query == {"q": ["a b"], "n": ["3"], "flag": ["true"], "many": ["x", "y"]}
    assert received.json() == {"name": "Ada", "tags": [1, 2]}
    assert received.header("Content-Type") == "application/json"
    assert result["status_code"] == 200
    assert result["json"]["method"] == method
    assert result["truncated"] is False
    assert result["elapsed_ms"] >= 0
    assert result["headers"]["Content-Type"] == "application/json"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_raw_body_is_sent_as_given(server, ctx, method):
    http_request(
        ctx,
        {
            "url": server.url("/raw"),
            "method": method,
            "headers": {"Content-Type": "text/csv"},
            "body": "id,name\n1,Ada\n",
        },
    )
    received = server.received("/raw")[0]
    assert received.body == b"id,name\n1,Ada\n"
    assert received.header("Content-Type") == "text/csv"


def test_head_has_no_body(server, ctx):
    result = http_request(ctx, {"url": server.url("/h"), "method": "HEAD"})
    assert result["status_code"] == 200 and result["text"] == ""
    assert server.received("/h")[0].method == "HEAD"


def test_text_response_and_expected_status(server, ctx):
    server.script("/made", Reply(201, headers={"Content-Type": "text/plain"}, body="made it"))
    result = http_request(ctx, {"url": server.url("/made"), "expected_status": [201, 202]})
    assert result["text"] == "made it" and "json" not in result

    with pytest.raises(PermanentError, match="HTTP 201"):
        http_request(ctx, {"url": server.url("/made"), "expected_status": 200})


def test_bearer_and_basic_auth(server, ctx):
    http_request(ctx, {"url": server.url("/b"), "auth": {"type": "bearer", "token": "tok-123"}})
    http_request(
        ctx,
        {"url": server.url("/c"), "auth": {"type": "basic", "username": "ada", "password": "pw-9"}},
    )
    assert server.received("/b")[0].header("Authorization") == "Bearer tok-123"
    assert server.received("/c")[0].header("Authorization") == "Basic YWRhOnB3LTk="


# --- outcomes ----------------------------------------------------------------------------------


def test_404_fails_at_once_with_status_and_excerpt(server, ctx):
    server.script("/missing", Reply(404, body="no such widget " + "x" * 1000))
    with pytest.raises(PermanentError) as failure:
        http_request(ctx, {"url": server.url("/missing")})
    message = str(failure.value)
    assert message.startswith(f"HTTP 404 Not Found from GET {server.url('/missing')}: no such")
    assert len(message) < 400


def test_retryable_statuses_retry_and_honour_retry_after(server, ctx):
    server.script("/busy", Reply(503, body="busy"))
    with pytest.raises(RetryableError) as plain:
        http_request(ctx, {"url": server.url("/busy")})
    assert plain.value.retry_after is None and "HTTP 503" in str(plain.value)

    server.script("/later", Reply(429, headers={"Retry-After": "7"}))
    with pytest.raises(RetryableError) as later:
        http_request(ctx, {"url": server.url("/later")})
    assert later.value.retry_after == 7

    # retry_on_status replaces the default list
    server.script("/gone", Reply(410))
    with pytest.raises(RetryableError):
        http_request(ctx, {"url": server.url("/gone"), "retry_on_status": [410]})
    with pytest.raises(PermanentError):
        http_request(ctx, {"url": server.url("/busy"), "retry_on_status": [410]})


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert retry_after("120", now) == 120
    assert retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90
    assert retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 0
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None
    assert retry_after("-5", now) is None


def test_read_timeout_and_connection_errors_are_retryable(server, ctx, settings):
    server.script("/slow", Reply(delay_s=1.5))
    with pytest.raises(RetryableError, match=r"read timeout after 0\.3s"):
        http_request(ctx, {"url": server.url("/slow"), "timeout_s": 0.3})

    with Listener() as gone:
        port = gone.port
    settings.QW_HTTP_ALLOWED_HOSTS = [f"127.0.0.1:{port}"]
    with pytest.raises(RetryableError, match="connection error"):
        http_request(ctx, {"url": f"http://127.0.0.1:{port}/"})


def test_timeout_never_exceeds_the_tasks_own(server):
    # the read waits for the task's 1 s, not the payload's 60: the task's own time limit
    server.script("/slow", Reply(delay_s=1.5))
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded, match=r"timed out after 1s"):
        http_request(FakeContext(timeout_s=1), {"url": server.url("/slow"), "timeout_s": 60})
    assert time.monotonic() - started < 1.4


def test_a_body_trickled_forever_is_cut_off_at_the_tasks_timeout(server):
    # every byte arrives well within the read timeout, but the body never ends
    server.script("/trickle", Reply(trickle_s=0.1))
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded, match=r"timed out after 1s"):
        http_request(FakeContext(timeout_s=1), {"url": server.url("/trickle"), "timeout_s": 1})
    assert 0.9 < time.monotonic() - started < 1.5


def test_the_deadline_spans_every_redirect_hop(server):
    # each hop answers within the read timeout; together they outlast the task
    for index in range(4):
        hop = Reply(302, headers={"Location": f"/slowhop{index + 1}"}, delay_s=0.4)
        server.script(f"/slowhop{index}", hop)
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded):
        http_request(FakeContext(timeout_s=1), {"url": server.url("/slowhop0"), "timeout_s": 1})
    assert time.monotonic() - started < 1.5


def test_each_thread_has_its_own_session_and_keeps_it():
    hosts = ["127.0.0.1:1"]
    mine = client.session(hosts)
    assert client.session(hosts) is mine
    theirs: list[Any] = []
    thread = threading.Thread(target=lambda: theirs.append(client.session(hosts)))
    thread.start()
    thread.join()
    assert theirs and theirs[0] is not mine
    assert client.session(["127.0.0.1:2"]) is not mine  # a new allow-list, a new session


# --- redirects ---------------------------------------------------------------------------------


def _chain(server: LoopbackServer, hops: int, status: int = 302) -> str:
    for index in range(hops):
        server.script(f"/hop{index}", Reply(status, headers={"Location": f"/hop{index + 1}"}))
    server.script(f"/hop{hops}", Reply(json={"arrived": True}))
    return server.url("/hop0")


def test_redirect_chain_is_followed_up_to_five_hops(server, ctx):
    result = http_request(ctx, {"url": _chain(server, 5)})
    assert result["json"] == {"arrived": True}
    assert result["redirects"] == 5 and result["url"] == server.url("/hop5")
    assert server.connections == 1  # every hop reused the connection


def test_a_sixth_redirect_fails_for_good(server, ctx):
    with pytest.raises(PermanentError, match="more than 5 redirects"):
        http_request(ctx, {"url": _chain(server, 6)})
    assert not server.received("/hop6")


def test_redirects_are_not_followed_when_asked(server, ctx):
    url = _chain(server, 1)
    result = http_request(ctx, {"url": url, "follow_redirects": False, "expected_status": 302})
    assert result["status_code"] == 302 and result["redirects"] == 0
    with pytest.raises(PermanentError, match="HTTP 302"):
        http_request(ctx, {"url": url, "follow_redirects": False})


def test_redirect_method_rules(server, ctx):
    server.script("/see-other", Reply(303, headers={"Location": "/after-303"}))
    server.script("/temporary", Reply(307, headers={"Location": "/after-307"}))
    http_request(ctx, {"url": server.url("/see-other"), "method": "POST", "json": {"a": 1}})
    http_request(ctx, {"url": server.url("/temporary"), "method": "POST", "json": {"a": 1}})
    after_303 = server.received("/after-303")[0]
    after_307 = server.received("/after-307")[0]
    assert after_303.method == "GET" and after_303.body == b""
    assert after_307.method == "POST" and after_307.json() == {"a": 1}


def test_credentials_do_not_follow_a_redirect_to_another_origin(server, ctx, settings):
    with LoopbackServer() as other:
        settings.QW_HTTP_ALLOWED_HOSTS = [server.netloc, other.netloc]
        server.script("/away", Reply(302, headers={"Location": other.url("/landed")}))
        http_request(
            ctx,
            {
                "url": server.url("/away"),
                "headers": {"X-Api-Key": "key-abcdef", "X-Trace": "t"},
                "auth": {"type": "bearer", "token": "tok-abcdef"},
            },
        )
        landed = other.received("/landed")[0]
    assert landed.header("Authorization") is None
    assert landed.header("X-Api-Key") is None
    assert landed.header("X-Trace") == "t"
    assert landed.header("Idempotency-Key") == f"qw-{ctx.task_id}"


# --- the SSRF guard at run time ----------------------------------------------------------------


def test_a_name_resolving_to_loopback_is_refused_without_a_connection(settings, ctx):
    settings.QW_HTTP_ALLOWED_HOSTS = []
    with Listener("127.0.0.1") as listener:
        with pytest.raises(PermanentError, match=r"localhost resolves to a private") as refused:
            http_request(ctx, {"url": f"http://localhost:{listener.port}/"})
        assert listener.accepted() == 0
    assert "127.0.0.1" not in str(refused.value)  # the internal address is the operator's


def test_a_redirect_to_a_refused_address_is_refused_without_a_connection(server, ctx):
    with Listener("127.0.0.2") as listener:
        target = f"http://127.0.0.2:{listener.port}/admin"
        server.script("/bounce", Reply(302, headers={"Location": target}))
        with pytest.raises(PermanentError, match=r"127\.0\.0\.2.*loopback"):
            http_request(ctx, {"url": server.url("/bounce")})
        assert listener.accepted() == 0


def test_a_redirect_to_another_scheme_is_refused(server, ctx):
    server.script("/ftp", Reply(302, headers={"Location": "ftp://example.com/file"}))
    with pytest.raises(PermanentError, match="only http and https"):
        http_request(ctx, {"url": server.url("/ftp")})


# --- bodies ------------------------------------------------------------------------------------


def test_a_body_over_the_cap_is_truncated(server, ctx):
    server.script("/big", Reply(headers={"Content-Type": "text/plain"}, body="a" * 5000))
    server.script("/bigjson", Reply(json={"data": "b" * 5000}))

    result = http_request(ctx, {"url": server.url("/big"), "max_response_bytes": 1000})
    as_json = http_request(ctx, {"url": server.url("/bigjson"), "max_response_bytes": 1000})
    whole = http_request(ctx, {"url": server.url("/big"), "max_response_bytes": 5000})

    assert result["truncated"] is True and result["text"] == "a" * 1000
    assert as_json["truncated"] is True and len(as_json["text"]) == 1000  # no longer JSON
    assert whole["truncated"] is False and len(whole["text"]) == 5000


def test_the_default_cap_is_the_setting(server, ctx, settings):
    settings.QW_HTTP_RESPONSE_BYTES = 10
    server.script("/big", Reply(headers={"Content-Type": "text/plain"}, body="c" * 50))
    assert http_request(ctx, {"url": server.url("/big")})["text"] == "c" * 10


def test_binary_and_nul_bytes_become_storable_text(server, ctx):
    server.script(
        "/bin", Reply(headers={"Content-Type": "application/octet-stream"}, body=b"a\x00\xff")
    )
    server.script("/nul", Reply(json={"s": "a\u0000b"}))
    assert http_request(ctx, {"url": server.url("/bin")})["text"] == "a\ufffd\ufffd"
    assert http_request(ctx, {"url": server.url("/nul")})["json"] == {"s": "a\ufffdb"}


# --- idempotency and secrets -------------------------------------------------------------------


def test_idempotency_key_is_the_same_on_every_attempt_of_a_task(server):
    first, second = FakeContext(attempt=1), FakeContext(attempt=2)
    second.task_id = first.task_id
    http_request(first, {"url": server.url("/k")})
    http_request(second, {"url": server.url("/k")})
    http_request(FakeContext(), {"url": server.url("/k")})
    keys = [r.header("Idempotency-Key") for r in server.received("/k")]
    assert keys[0] == keys[1] == f"qw-{first.task_id}"
    assert keys[2] != keys[0]


def test_a_payloads_own_idempotency_key_wins(server, ctx):
    http_request(ctx, {"url": server.url("/k"), "headers": {"idempotency-key": "mine-1"}})
    assert server.received("/k")[0].header("Idempotency-Key") == "mine-1"


def test_secrets_are_resolved_at_send_time_and_scrubbed_from_the_result(server, ctx, monkeypatch):
    monkeypatch.setenv("QW_SECRET_API_TOKEN", "s3cr3t-token-value")
    monkeypatch.setenv("QW_SECRET_API_TOKEN_HOSTS", server.netloc)
    monkeypatch.setenv("QW_SECRET_TENANT", "tenant-zz")
    monkeypatch.setenv("QW_SECRET_TENANT_HOSTS", f"elsewhere.test, {server.host}")
    payload = {
        "url": server.url("/echo"),
        "method": "POST",
        "headers": {"X-Tenant": {"$secret": "TENANT"}},
        "params": {"t": {"$secret": "TENANT"}},
        "json": {"nested": [{"$secret": "TENANT"}]},
        "auth": {"type": "bearer", "token": {"$secret": "API_TOKEN"}},
    }
    stored = json.dumps(payload)

    result = http_request(ctx, payload)

    received = server.received("/echo")[0]
    assert received.header("Authorization") == "Bearer s3cr3t-token-value"
    assert received.header("X-Tenant") == "tenant-zz"
    assert received.query == {"t": ["tenant-zz"]}
    assert received.json() == {"nested": ["tenant-zz"]}
    assert json.dumps(payload) == stored  # the payload keeps its references
    shown = json.dumps([result, ctx.logs])
    assert "s3cr3t-token-value" not in shown and "tenant-zz" not in shown
    assert "[REDACTED]" in shown


def test_a_missing_secret_fails_naming_its_variable(server, ctx, monkeypatch):
    monkeypatch.delenv("QW_SECRET_NOPE", raising=False)
    monkeypatch.setenv("QW_SECRET_NOPE_HOSTS", server.netloc)
    with pytest.raises(PermanentError, match="QW_SECRET_NOPE"):
        http_request(ctx, {"url": server.url("/x"), "headers": {"X": {"$secret": "NOPE"}}})
    assert not server.requests


def test_a_secret_file_is_read_at_send_time(server, ctx, monkeypatch, tmp_path):
    secret_file = tmp_path / "token"
    secret_file.write_text("from-a-file-1\n")
    monkeypatch.setenv("QW_SECRET_FILED_FILE", str(secret_file))
    monkeypatch.setenv("QW_SECRET_FILED_HOSTS", server.netloc)
    http_request(ctx, {"url": server.url("/f"), "headers": {"X-Key": {"$secret": "FILED"}}})
    assert server.received("/f")[0].header("X-Key") == "from-a-file-1"


@pytest.mark.parametrize("hosts", [None, "api.example.org", "127.0.0.1:1"])
def test_a_secret_not_bound_to_the_url_fails_before_anything_is_sent(
    server, ctx, monkeypatch, hosts
):
    # given a task queued before its secret was bound (or bound to another destination)
    monkeypatch.setenv("QW_SECRET_UNBOUND", "unbound-value-77")
    if hosts is None:
        monkeypatch.delenv("QW_SECRET_UNBOUND_HOSTS", raising=False)
    else:
        monkeypatch.setenv("QW_SECRET_UNBOUND_HOSTS", hosts)

    # when it runs, then it fails at once naming the secret and the destination
    with pytest.raises(PermanentError) as refused:
        http_request(ctx, {"url": server.url("/x"), "headers": {"X-Key": {"$secret": "UNBOUND"}}})
    assert str(refused.value).startswith(f"secret UNBOUND is not bound to {server.netloc}")
    if hosts is None:
        assert "QW_SECRET_UNBOUND_HOSTS is not set" in str(refused.value)
    assert not server.requests


def test_a_url_from_a_secret_is_checked_against_its_list_without_naming_its_host(
    server, ctx, monkeypatch
):
    monkeypatch.setenv("QW_SECRET_ENDPOINT", server.url("/hidden"))
    monkeypatch.setenv("QW_SECRET_ENDPOINT_HOSTS", "api.example.org")
    with pytest.raises(PermanentError) as refused:
        http_request(ctx, {"url": {"$secret": "ENDPOINT"}})
    assert str(refused.value) == "secret ENDPOINT is not bound to the URL's host"
    assert not server.requests

    monkeypatch.setenv("QW_SECRET_ENDPOINT_HOSTS", server.netloc)
    assert http_request(ctx, {"url": {"$secret": "ENDPOINT"}})["status_code"] == 200
    assert server.received("/hidden")


SECRET_PLACES: dict[str, dict[str, Any]] = {
    "header": {"headers": {"X-Token": {"$secret": "CARRIED"}}},
    "auth": {"auth": {"type": "bearer", "token": {"$secret": "CARRIED"}}},
    "param": {"params": {"token": {"$secret": "CARRIED"}}},
    "json": {"json": {"token": {"$secret": "CARRIED"}}},
    "body": {"body": {"$secret": "CARRIED"}},
}


@pytest.mark.parametrize("status", [302, 307, 308])
@pytest.mark.parametrize("place", sorted(SECRET_PLACES))
def test_a_redirect_to_another_origin_is_not_followed_with_a_secret(
    server, ctx, settings, monkeypatch, status, place
):
    with LoopbackServer() as other:
        # given a secret bound to two servers, and the first redirecting to the second
        settings.QW_HTTP_ALLOWED_HOSTS = [server.netloc, other.netloc]
        monkeypatch.setenv("QW_SECRET_CARRIED", "carried-secret-value-5")
        monkeypatch.setenv("QW_SECRET_CARRIED_HOSTS", f"{server.netloc},{other.netloc}")
        server.script("/away", Reply(status, headers={"Location": other.url("/landed")}))
        payload = {"url": server.url("/away"), "method": "POST", **SECRET_PLACES[place]}

        # when the task runs, then it fails at once and the other origin sees nothing
        with pytest.raises(PermanentError) as refused:
            http_request(ctx, payload)
        assert not other.requests
    message = str(refused.value)
    assert f"redirect to another origin (http://{other.netloc}) not followed" in message
    assert "carries secret CARRIED" in message
    assert "carried-secret-value-5" not in message
    assert len(server.received("/away")) == 1


def test_a_refused_redirect_from_a_secret_url_does_not_name_its_host(
    server, ctx, settings, monkeypatch
):
    with LoopbackServer() as other:
        settings.QW_HTTP_ALLOWED_HOSTS = [server.netloc, other.netloc]
        monkeypatch.setenv("QW_SECRET_ENDPOINT", server.url("/hidden-away"))
        monkeypatch.setenv("QW_SECRET_ENDPOINT_HOSTS", server.netloc)
        server.script("/hidden-away", Reply(302, headers={"Location": other.url("/landed")}))
        with pytest.raises(PermanentError) as refused:
            http_request(ctx, {"url": {"$secret": "ENDPOINT"}})
        assert not other.requests
    assert "not followed" in str(refused.value)
    assert server.netloc not in str(refused.value)


def test_a_redirect_within_the_origin_is_followed_with_a_secret(server, ctx, monkeypatch):
    monkeypatch.setenv("QW_SECRET_CARRIED", "carried-secret-value-6")
    monkeypatch.setenv("QW_SECRET_CARRIED_HOSTS", server.netloc)
    server.script("/moved", Reply(307, headers={"Location": "/here"}))
    result = http_request(
        ctx,
        {"url": server.url("/moved"), "method": "POST", "json": {"t": {"$secret": "CARRIED"}}},
    )
    assert result["redirects"] == 1
    assert server.received("/here")[0].json() == {"t": "carried-secret-value-6"}


ENCODED_SECRET = "k3y with/slash+plus&amp=eq"


@pytest.mark.django_db
def test_a_secret_in_params_is_in_no_stored_url_error_or_log(server, monkeypatch):
    # given a secret that a query string percent-encodes, sent as a param
    monkeypatch.setenv("QW_SECRET_API_KEY", ENCODED_SECRET)
    monkeypatch.setenv("QW_SECRET_API_KEY_HOSTS", server.netloc)
    server.script("/refuse", Reply(422, body="no"))
    params = {"params": {"api_key": {"$secret": "API_KEY"}}}
    completed = make_task(type="HTTP_REQUEST", attempt=1)
    failed = make_task(type="HTTP_REQUEST", attempt=1)

    # when one task completes and one fails, both POSTs (so both record a log row)
    result = http_request(
        TaskContext(completed), {"url": server.url("/ok"), "method": "POST", **params}
    )
    with pytest.raises(PermanentError) as failure:
        http_request(
            TaskContext(failed), {"url": server.url("/refuse"), "method": "POST", **params}
        )

    # then the server got it, and no form of it is in the result, the error or the log rows
    assert server.received("/ok")[0].query == {"api_key": [ENCODED_SECRET]}
    logs = list(TaskLog.objects.filter(task__in=[completed, failed]).values("message", "data"))
    shown = json.dumps([result, str(failure.value), logs])
    for form in (
        ENCODED_SECRET,
        quote(ENCODED_SECRET),
        quote_plus(ENCODED_SECRET),
        quote(ENCODED_SECRET, safe=""),
    ):
        assert form not in shown, form
    assert result["url"] == server.url("/ok?api_key=[REDACTED]")
    assert "api_key=[REDACTED]" in str(failure.value)


# --- at most once ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_recorded_response_is_replayed_not_requested_again(server):
    # given a POST whose first attempt got its response recorded, then lost its worker
    task = make_task(type="HTTP_REQUEST", attempt=1)
    payload = {"url": server.url("/charge"), "method": "POST", "json": {"amount": 5}}
    server.script("/charge", Reply(201, json={"charge": "ch_1"}))
    first = http_request(TaskContext(task), payload)
    assert recorded_response(task.id)["outcome"] == "completed"

    # when the next attempt runs
    task.attempt = 2
    again = http_request(TaskContext(task), payload)

    # then it returns the recorded response without a second request
    assert again == first
    assert len(server.received("/charge")) == 1
    events = list(TaskLog.objects.filter(task=task).values_list("event", "data__attempt"))
    assert ("http_response", 1) in events and ("http_response_reused", 2) in events


@pytest.mark.django_db
def test_a_recorded_failure_is_replayed_as_a_failure(server):
    task = make_task(type="HTTP_REQUEST", attempt=1)
    payload = {"url": server.url("/refuse"), "method": "DELETE"}
    server.script("/refuse", Reply(422, body="invalid"))
    with pytest.raises(PermanentError, match="HTTP 422"):
        http_request(TaskContext(task), payload)
    task.attempt = 2
    with pytest.raises(PermanentError, match="HTTP 422"):
        http_request(TaskContext(task), payload)
    assert len(server.received("/refuse")) == 1


@pytest.mark.django_db
def test_a_manual_retry_requests_again(server):
    task = make_task(type="HTTP_REQUEST", attempt=1)
    payload = {"url": server.url("/p"), "method": "PUT", "json": {}}
    http_request(TaskContext(task), payload)
    TaskLog.objects.create(task=task, event="requeued", data={"attempt": 1})
    task.attempt = 2
    http_request(TaskContext(task), payload)
    assert len(server.received("/p")) == 2


@pytest.mark.django_db
def test_retryable_outcomes_and_safe_methods_are_not_recorded(server):
    task = make_task(type="HTTP_REQUEST", attempt=1)
    server.script("/busy", Reply(503))
    with pytest.raises(RetryableError):
        http_request(TaskContext(task), {"url": server.url("/busy"), "method": "POST"})
    http_request(TaskContext(task), {"url": server.url("/read")})
    assert recorded_response(task.id) is None


def test_response_headers_are_read_in_any_case_and_credentials_redacted(server, ctx):
    server.script(
        "/lower",
        Reply(body='{"a": 1}', headers={"content-type": "application/json", "set-cookie": "s=1"}),
    )
    server.script("/later", Reply(503, headers={"retry-after": "3"}))

    result = http_request(ctx, {"url": server.url("/lower")})
    with pytest.raises(RetryableError) as later:
        http_request(ctx, {"url": server.url("/later")})

    assert result["json"] == {"a": 1}
    assert result["headers"]["set-cookie"] == "[REDACTED]"
    assert later.value.retry_after == 3


def test_task_problems_compare_the_request_timeout_with_the_tasks():
    assert task_problems({"url": "x", "timeout_s": 30}, timeout_s=30) == []
    assert task_problems({"url": "x"}, timeout_s=5) == []
    assert task_problems({"url": "x", "timeout_s": 31}, timeout_s=30) == [
        ("timeout_s", "31 is greater than the task's own timeout_s (30)")
    ]


def test_text_is_decoded_with_its_charset_or_utf8(server, ctx):
    server.script("/utf8", Reply(headers={"Content-Type": "text/plain"}, body="café ✓"))
    server.script(
        "/latin", Reply(headers={"Content-Type": "text/plain; charset=ISO-8859-1"}, body=b"caf\xe9")
    )
    server.script("/odd", Reply(headers={"Content-Type": "text/plain; charset=nope"}, body="ok ✓"))
    assert http_request(ctx, {"url": server.url("/utf8")})["text"] == "café ✓"
    assert http_request(ctx, {"url": server.url("/latin")})["text"] == "café"
    assert http_request(ctx, {"url": server.url("/odd")})["text"] == "ok ✓"
