"""Redaction: one rule (``redaction.redact``), one logging filter, one serializer rule."""

from __future__ import annotations

import io
import json
import logging
import urllib.parse

import pytest

from queueworker import redaction
from queueworker.redaction import REDACTED, RedactingFilter, redact, redact_text
from tasks_app.models import TaskLog
from tests.unit._helpers import make_task

# --- the rule ----------------------------------------------------------------------------------


def test_sensitive_headers_are_redacted_at_any_depth_in_any_case():
    value = {
        "headers": {
            "authorization": "Bearer a1",
            "Proxy-Authorization": "Basic b2",
            "COOKIE": "sid=c3",
            "Set-Cookie": "sid=d4",
            "X-Api-Key": "e5",
            "X-Trace": "keep",
        },
        "list": [{"Authorization": "Token f6"}],
    }
    shown = redact(value)
    assert shown["headers"] == {
        "authorization": REDACTED,
        "Proxy-Authorization": REDACTED,
        "COOKIE": REDACTED,
        "Set-Cookie": REDACTED,
        "X-Api-Key": REDACTED,
        "X-Trace": "keep",
    }
    assert shown["list"] == [{"Authorization": REDACTED}]
    assert value["headers"]["authorization"] == "Bearer a1"  # a copy, not in place


def test_auth_is_redacted_but_its_type_and_secret_references_are_kept():
    shown = redact(
        {
            "auth": {"type": "basic", "username": "ada", "password": "pw"},
            "other": {"auth": {"type": "bearer", "token": {"$secret": "API"}}},
            "flat": {"auth": "Bearer x"},
        }
    )
    assert shown["auth"] == {"type": "basic", "username": REDACTED, "password": REDACTED}
    assert shown["other"]["auth"] == {"type": "bearer", "token": {"$secret": "API"}}
    assert shown["flat"]["auth"] == REDACTED


def test_url_userinfo_is_redacted_in_any_string():
    assert redact({"url": "https://ada:pw@example.com/x?y=1"}) == {
        "url": f"https://{REDACTED}@example.com/x?y=1"
    }
    assert redact_text("GET http://token@h.test/ failed") == f"GET http://{REDACTED}@h.test/ failed"
    assert redact_text("mail ada@example.com") == "mail ada@example.com"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Authorization: Bearer abc.def", f"Authorization: {REDACTED}"),
        ('{"Authorization": "Bearer abc"}', f'{{"Authorization": "{REDACTED}"}}'),
        ("{'x-api-key': 'k1', 'a': 1}", f"{{'x-api-key': '{REDACTED}', 'a': 1}}"),
        ("set-cookie=sid=1; Path=/", f"set-cookie={REDACTED}"),
        ("?token=abc&page=2", f"?token={REDACTED}&page=2"),
        ("password: hunter22", f"password: {REDACTED}"),
        ("no credentials here: 42", "no credentials here: 42"),
    ],
)
def test_named_values_in_text_are_redacted(text, shown):
    assert redact_text(text) == shown


def test_known_secret_values_are_scrubbed_everywhere(monkeypatch, tmp_path):
    # given secrets in this process's environment, one of them from a file
    secret_file = tmp_path / "s"
    secret_file.write_text("file-secret-9\n")
    monkeypatch.setenv("QW_SECRET_ONE", "env-secret-1")
    monkeypatch.setenv("QW_SECRET_TWO_FILE", str(secret_file))
    monkeypatch.setattr(redaction, "_env_loaded", False)

    # then they are scrubbed from any string, in any structure
    assert redact(["x env-secret-1 y", {"k": "file-secret-9"}]) == [
        f"x {REDACTED} y",
        {"k": REDACTED},
    ]
    # and a value shorter than the minimum is left alone (it would blank ordinary words)
    redaction.register_secret("abc")
    assert redact_text("abc") == "abc"


def test_secret_host_lists_and_file_paths_are_not_redacted(monkeypatch, tmp_path):
    # given a secret with its host list, one from a file with its list from a file too
    secret_file, hosts_file = tmp_path / "secret-value-file", tmp_path / "hosts"
    secret_file.write_text("filed-secret-31\n")
    hosts_file.write_text("filed-hosts.example.org\n")
    monkeypatch.setenv("QW_SECRET_LISTED", "listed-secret-30")
    monkeypatch.setenv("QW_SECRET_LISTED_HOSTS", "bound-host.example.org,10.9.8.7:8443")
    monkeypatch.setenv("QW_SECRET_FILED_FILE", str(secret_file))
    monkeypatch.setenv("QW_SECRET_FILED_HOSTS_FILE", str(hosts_file))
    monkeypatch.setattr(redaction, "_env_loaded", False)

    # when text names the hosts, the file paths and the secrets
    text = (
        f"GET https://bound-host.example.org/a and https://filed-hosts.example.org/ "
        f"with listed-secret-30 and filed-secret-31 read from {secret_file}"
    )
    shown = redact_text(text)

    # then only the secrets are scrubbed: lists and paths are configuration
    assert shown == (
        f"GET https://bound-host.example.org/a and https://filed-hosts.example.org/ "
        f"with {REDACTED} and {REDACTED} read from {secret_file}"
    )
    assert redact_text("bound-host.example.org,10.9.8.7:8443") == (
        "bound-host.example.org,10.9.8.7:8443"
    )


@pytest.mark.parametrize(
    "encode",
    [
        lambda v: v,
        urllib.parse.quote,
        urllib.parse.quote_plus,
        lambda v: urllib.parse.quote(v, safe=""),
        lambda v: urllib.parse.urlencode({"k": v}).removeprefix("k="),  # as requests' params
    ],
    ids=["raw", "quote", "quote_plus", "quote-safe-empty", "urlencode"],
)
def test_percent_encoded_forms_of_a_secret_are_scrubbed(encode):
    registered, scoped = "reg s3cr/t+val&ue=1", "scoped k3y/+ &=v"
    redaction.register_secret(registered)
    url = f"https://api.example.org/v1/{encode(registered)}?x={encode(scoped)}"
    with redaction.scrubbing([scoped]):
        shown = redact_text(url)
    assert shown == f"https://api.example.org/v1/{REDACTED}?x={REDACTED}"


def test_scrubbing_covers_a_requests_own_values_only_inside_the_block():
    with redaction.scrubbing(["literal-token-7", "ab"]):
        assert redact_text("sent literal-token-7") == f"sent {REDACTED}"
    assert redact_text("sent literal-token-7") == "sent literal-token-7"


# --- the logging filter ------------------------------------------------------------------------


def _logger_with_filter() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.redaction.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_the_logging_filter_redacts_messages_arguments_and_tracebacks():
    redaction.register_secret("planted-secret-42")
    logger, stream = _logger_with_filter()

    logger.info(
        "payload %s", {"auth": {"type": "basic", "password": "pw-1"}, "url": "http://u:p@h/"}
    )
    logger.warning("calling with Authorization: Bearer tok-2 and planted-secret-42")
    try:
        raise RuntimeError("boom: planted-secret-42")
    except RuntimeError:
        logger.exception("failed for %(who)s", {"who": "planted-secret-42"})

    output = stream.getvalue()
    for secret in ("pw-1", "u:p@", "tok-2", "planted-secret-42"):
        assert secret not in output
    assert "Traceback (most recent call last)" in output and "RuntimeError: boom:" in output
    assert "'type': 'basic'" in output


def test_the_filter_is_wired_into_the_configured_handlers(settings):
    assert settings.LOGGING["filters"]["redact"]["()"] == "queueworker.redaction.RedactingFilter"
    assert "redact" in settings.LOGGING["handlers"]["default"]["filters"]
    root_filters = [f for h in logging.getLogger().handlers for f in h.filters]
    assert any(isinstance(f, RedactingFilter) for f in root_filters)


# --- the serializer rule -----------------------------------------------------------------------


@pytest.mark.django_db
def test_api_output_redacts_payload_error_and_log_rows(api, user):
    # given a task whose payload, error and log rows hold credentials
    redaction.register_secret("planted-secret-43")
    payload = {
        "url": "https://ada:pw-3@example.com/",
        "headers": {"Authorization": "Bearer tok-4", "X-Trace": "t"},
        "auth": {"type": "bearer", "token": "tok-5"},
    }
    created = api.post("/api/tasks/", {"type": "HTTP_REQUEST", "payload": payload}, format="json")
    assert created.status_code == 201
    task_id = created.json()["id"]
    task = make_task(owner=user, type="HTTP_REQUEST", payload=payload, error="planted-secret-43")
    TaskLog.objects.create(
        task=task,
        event="http_response",
        message="GET https://ada:pw-3@example.com/ Authorization: Bearer tok-4",
        data={"headers": {"Set-Cookie": "sid=6"}, "note": "planted-secret-43"},
    )

    # when the API shows them
    shown = [
        created.content,
        api.get(f"/api/tasks/{task_id}/").content,
        api.get(f"/api/tasks/{task.id}/").content,
        api.get("/api/tasks/").content,
        api.get(f"/api/tasks/{task.id}/logs/").content,
    ]

    # then no credential is in any response, and the stored rows are unchanged
    text = b"\n".join(shown).decode()
    for secret in ("pw-3", "tok-4", "tok-5", "sid=6", "planted-secret-43"):
        assert secret not in text, secret
    detail = json.loads(shown[1])
    assert detail["payload"]["headers"] == {"Authorization": REDACTED, "X-Trace": "t"}
    assert detail["payload"]["auth"] == {"type": "bearer", "token": REDACTED}
    task.refresh_from_db()
    assert task.payload == payload
