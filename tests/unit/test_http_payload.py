"""HTTP_REQUEST payloads are checked when the task is created: 400 naming the field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks_app.models import Task

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
URL = "https://api.example.com/v1/things"


def _create(api, payload, **extra):
    return api.post(
        "/api/tasks/", {"type": "HTTP_REQUEST", "payload": payload, **extra}, format="json"
    )


def _payload_errors(response):
    assert response.status_code == 400, response.content
    return response.json()["payload"]


def test_a_full_payload_is_accepted_and_routed_to_its_queue(api):
    payload = {
        "url": URL,
        "method": "PATCH",
        "headers": {"X-Trace": "t", "Content-Type": "application/json"},
        "params": {"q": "x", "n": 1, "on": True, "ids": [1, "2"]},
        "json": {"a": [1, {"b": None}]},
        "auth": {"type": "basic", "username": "u", "password": "p"},
        "timeout_s": 2.5,
        "expected_status": [200, 204],
        "retry_on_status": [503],
        "follow_redirects": False,
        "max_response_bytes": 2048,
    }
    response = _create(api, payload)
    assert response.status_code == 201, response.content
    assert Task.objects.get(pk=response.json()["id"]).queue == "http.request"


def test_secret_references_are_accepted_wherever_a_string_is(api, monkeypatch):
    monkeypatch.setenv("QW_SECRET_API_TOKEN_HOSTS", "api.example.com")
    monkeypatch.setenv("QW_SECRET_ENDPOINT_HOSTS", "api.example.com")
    secret = {"$secret": "API_TOKEN"}
    payload = {
        "url": {"$secret": "ENDPOINT"},
        "headers": {"X-Api-Key": secret},
        "params": {"key": secret, "many": ["a", secret]},
        "json": {"deep": [{"k": secret}]},
        "auth": {"type": "bearer", "token": secret},
    }
    response = _create(api, payload)
    assert response.status_code == 201, response.content
    assert Task.objects.get(pk=response.json()["id"]).payload == payload  # never resolved
    assert _create(api, {"url": URL, "method": "POST", "body": secret}).status_code == 201


def test_a_secret_not_bound_to_the_url_is_400_naming_its_field(api, monkeypatch):
    # given a secret bound to one API, a secret with no list, and no value in this process
    monkeypatch.setenv("QW_SECRET_ORDERS_TOKEN_HOSTS", "orders.example.com")
    monkeypatch.delenv("QW_SECRET_ORDERS_TOKEN", raising=False)
    monkeypatch.delenv("QW_SECRET_LOOSE_HOSTS", raising=False)

    # when a task would send them elsewhere
    elsewhere = _create(
        api,
        {
            "url": URL,
            "headers": {"X-Api-Key": {"$secret": "ORDERS_TOKEN"}},
            "params": {"k": {"$secret": "LOOSE"}},
        },
    )
    unbound_url = _create(api, {"url": {"$secret": "LOOSE"}})
    bound = _create(
        api,
        {
            "url": "https://Orders.Example.com/v1",
            "auth": {"type": "bearer", "token": {"$secret": "ORDERS_TOKEN"}},
        },
    )

    # then each field at fault is named, and only the bound one is created
    assert _payload_errors(elsewhere) == {
        "headers": ["X-Api-Key: secret ORDERS_TOKEN is not bound to api.example.com"],
        "params": [
            "k: secret LOOSE is not bound to api.example.com (QW_SECRET_LOOSE_HOSTS is not set)"
        ],
    }
    assert _payload_errors(unbound_url) == {
        "url": ["secret LOOSE is not bound to any host (QW_SECRET_LOOSE_HOSTS is not set)"]
    }
    assert bound.status_code == 201, bound.content
    assert Task.objects.count() == 1


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({}, "url", "this field is required"),
        ({"url": "ftp://example.com/f"}, "url", "only http and https URLs are allowed"),
        ({"url": "not a url"}, "url", "Enter a valid URL."),
        ({"url": "example.com/path"}, "url", "only http and https"),
        ({"url": "http:///nohost"}, "url", "no host"),
        ({"url": URL, "method": "FETCH"}, "method", "'FETCH' is not one of"),
        ({"url": URL, "json": {}, "body": "x"}, "body", "give json or body, not both"),
        ({"url": URL, "auth": {"type": "digest"}}, "auth", "type: 'digest' is not one of"),
        ({"url": URL, "auth": {"type": "bearer"}}, "auth", "token: this field is required"),
        (
            {"url": URL, "auth": {"type": "basic", "username": "u"}},
            "auth",
            "password: this field is required",
        ),
        (
            {"url": URL, "auth": {"type": "basic", "username": "u", "password": "p", "token": "t"}},
            "auth",
            "token: not used with type basic",
        ),
        ({"url": URL, "headers": {"Content-Length": "5"}}, "headers", "Content-Length: set by"),
        ({"url": URL, "headers": {"Host": "internal"}}, "headers", "Host: set by"),
        ({"url": URL, "headers": {"X-A": "a\r\nX-B: b"}}, "headers", "X-A: 'a\\r\\nX-B: b' does"),
        ({"url": URL, "headers": {"Bad Name": "x"}}, "headers", "does not match"),
        ({"url": URL, "headers": {"X": 5}}, "headers", "X: 5 is not of type 'string'"),
        ({"url": URL, "timeout_s": 0}, "timeout_s", "less than or equal to the minimum of 0"),
        ({"url": URL, "timeout_s": 301}, "timeout_s", "maximum of 300.0 (QW_HTTP_MAX_TIMEOUT_S)"),
        ({"url": URL, "expected_status": 99}, "expected_status", "less than the minimum of 100"),
        ({"url": URL, "expected_status": []}, "expected_status", "should be non-empty"),
        ({"url": URL, "retry_on_status": [600]}, "retry_on_status", "maximum of 599"),
        ({"url": URL, "follow_redirects": "yes"}, "follow_redirects", "not of type 'boolean'"),
        (
            {"url": URL, "max_response_bytes": 10 * 1024 * 1024 + 1},
            "max_response_bytes",
            "(QW_HTTP_MAX_RESPONSE_BYTES)",
        ),
        ({"url": URL, "verify": False}, "verify", "unknown field"),
        ({"url": {"$secret": "lower"}}, "url", "does not match"),
        ({"url": {"$secret": "A", "b": 1}}, "url", "unknown field"),
        ({"url": URL, "json": {"k": {"$secret": "A", "x": 1}}}, "json", "only the key $secret"),
        ({"url": URL, "json": [{"$secret": "bad name"}]}, "json", "a secret name matches"),
    ],
)
def test_bad_payloads_answer_400_naming_the_field(api, payload, field, message):
    errors = _payload_errors(_create(api, payload))
    assert field in errors, errors
    assert any(message in text for text in errors[field]), errors
    assert not Task.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://127.0.0.1./",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://[2002:7f00:1::]/",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
        "http://10.0.0.1/",
        "http://192.168.0.1:8080/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://user:pw@10.0.0.1/",
    ],
)
def test_a_literal_address_the_guard_refuses_is_400_at_create(api, url):
    errors = _payload_errors(_create(api, {"url": url}))
    assert errors["url"][0].startswith("refused: "), errors
    assert "QW_HTTP_ALLOWED_HOSTS" in errors["url"][0]


def test_allowed_hosts_opt_a_destination_in(api, settings):
    settings.QW_HTTP_ALLOWED_HOSTS = ["127.0.0.1:8080", "internal.example"]
    assert _create(api, {"url": "http://127.0.0.1:8080/x"}).status_code == 201
    assert _create(api, {"url": "http://internal.example/x"}).status_code == 201
    assert _create(api, {"url": "http://127.0.0.1:8081/x"}).status_code == 400


def test_names_are_checked_when_resolved_not_at_create(api):
    # localhost resolves to 127.0.0.1: the worker refuses it (see the integration tests)
    assert _create(api, {"url": "http://localhost:8000/"}).status_code == 201


def test_bulk_create_with_one_bad_http_payload_creates_nothing(api):
    tasks = [
        {"type": "HTTP_REQUEST", "payload": {"url": URL}},
        {"type": "HTTP_REQUEST", "payload": {"url": "http://169.254.169.254/"}},
    ]
    response = api.post("/api/tasks/bulk/", {"tasks": tasks}, format="json")
    assert response.status_code == 400
    assert "refused" in json.dumps(response.json())
    assert not Task.objects.exists()


# --- shipped settings --------------------------------------------------------------------------


def _settings_process(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QW_HTTP_")}
    clean.update(env)
    code = (
        "import django, json, os; os.environ['DJANGO_SETTINGS_MODULE']='queueworker.settings'; "
        "django.setup(); from django.conf import settings as s; "
        "print(json.dumps([s.QW_HTTP_ALLOWED_HOSTS, s.QW_HTTP_TIMEOUT_S, s.QW_HTTP_MAX_TIMEOUT_S, "
        "s.QW_HTTP_RESPONSE_BYTES, s.QW_HTTP_MAX_RESPONSE_BYTES, s.QW_HTTP_MAX_REDIRECTS]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_shipped_settings_allow_no_private_destination():
    proc = _settings_process()
    assert proc.returncode == 0, proc.stderr
    allowed, timeout, max_timeout, cap, max_cap, redirects = json.loads(proc.stdout)
    assert allowed == []
    assert (timeout, max_timeout, cap, max_cap, redirects) == (30, 300, 1048576, 10485760, 5)


def test_shipped_deployment_files_leave_the_allow_list_empty():
    candidates = [
        ROOT / "Procfile",
        ROOT / "compose.yaml",
        ROOT / ".env.example",
        ROOT / "Dockerfile",
    ]
    for folder in ("deploy", "docker"):
        if (ROOT / folder).is_dir():
            candidates.extend(p for p in (ROOT / folder).rglob("*") if p.is_file())
    assignment = re.compile(r"QW_HTTP_ALLOWED_HOSTS\W+(?:value\W+)?([^\s\"'#]*)")
    comment = re.compile(r"(?:^|\s)#.*$", re.MULTILINE)  # prose may name the variable
    for path in candidates:
        if not path.is_file():
            continue
        text = comment.sub("", path.read_text(errors="replace"))
        for match in assignment.finditer(text):
            assert match.group(1) == "", f"{path.relative_to(ROOT)} sets QW_HTTP_ALLOWED_HOSTS"


def test_a_malformed_allowed_host_stops_the_process():
    proc = _settings_process(QW_HTTP_ALLOWED_HOSTS="example.com:http")
    assert proc.returncode != 0
    assert "QW_HTTP_ALLOWED_HOSTS: 'example.com:http': the port must be" in proc.stderr


def test_http_timeouts_must_fit_the_task_limit():
    proc = _settings_process(QW_HTTP_MAX_TIMEOUT_S="5000")
    assert proc.returncode != 0 and "QW_HTTP_MAX_TIMEOUT_S" in proc.stderr
