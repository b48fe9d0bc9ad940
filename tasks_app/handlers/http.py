"""``HTTP_REQUEST``: call a URL a user gave us, safely, with effects at most once.

1. At create: the payload schema, then ``validate_payload`` (json or body, allowed headers,
   limits from settings, the SSRF guard on a literal address, and every ``{"$secret": NAME}``
   bound to the URL's host by ``QW_SECRET_<NAME>_HOSTS``: a 400 naming the field).
2. At run: for a method with effects (POST, PUT, PATCH, DELETE) on a later attempt, a response
   recorded by an earlier attempt whose worker died before finishing is returned as it was,
   and the URL is not requested again.
3. Secrets (``{"$secret": NAME}``) are checked against their bindings again (the lists may
   have changed since create), resolved, and the request's credentials (in every encoding a
   URL gives them) are scrubbed from everything the attempt writes.
4. One exchange over the process's pooled session (``tasks_app.http.client``): the guard checks
   every connection, redirects are followed up to ``QW_HTTP_MAX_REDIRECTS`` (never to another
   origin while the request carries a secret; bindings checked per hop), the body is read
   up to ``max_response_bytes``. The task's ``timeout_s`` bounds the whole exchange (connect,
   every read, every hop, the body), whatever the pool: under ``-P threads``, and in the
   process's pool that runs a message's HTTP tasks together (the type is registered
   ``io_bound``, ``tasks_app.concurrent``), no signal reaches the thread, so the transport keeps
   the deadline and its end fails the attempt as a timeout (failure class ``timeout``, as
   Celery's soft limit does under prefork). Every request
   carries ``Idempotency-Key: qw-<task id>``, the same on every retry, unless the payload sets
   its own.
5. The outcome: an expected status → the result; ``retry_on_status``, connection errors and
   timeouts → retry (``Retry-After`` honoured, capped by the backoff maximum); anything else →
   FAILED at once with the status and a short excerpt of the body. A final outcome of a method
   with effects is recorded (TaskLog ``http_response``) before it is returned.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from queueworker import redaction
from tasks_app.errors import PermanentError, RetryableError
from tasks_app.handlers.registry import Context, register
from tasks_app.http import client, secrets
from tasks_app.http.guard import DestinationRefused, check_url, parse_allowed_hosts, parse_target
from tasks_app.http.secrets import or_secret
from tasks_app.models import TaskLog
from tasks_app.task_types import TaskType

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
WITH_EFFECTS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_RETRY_ON_STATUS = (408, 425, 429, 500, 502, 503, 504)
# Set by the client from the body and the connection; a payload's value could desynchronise a
# pooled keep-alive connection or aim the request at another virtual host.
FORBIDDEN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
RECORDED_EVENT = "http_response"
REUSED_EVENT = "http_response_reused"
REQUEUED_EVENT = "requeued"
EXCERPT_CHARS = 200
IDEMPOTENCY_HEADER = "Idempotency-Key"

_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$"
_STRING = {"type": "string", "maxLength": 65536}
_STATUS = {"type": "integer", "minimum": 100, "maximum": 599}
_SCALAR = {"type": ["string", "number", "boolean"]}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "url": or_secret({"type": "string", "minLength": 1, "maxLength": 8192}),
        "method": {"enum": list(METHODS), "default": "GET"},
        "headers": {
            "type": "object",
            "maxProperties": 100,
            "propertyNames": {"pattern": _HEADER_NAME},
            "additionalProperties": or_secret(
                {"type": "string", "maxLength": 8192, "pattern": "^[^\\r\\n\\u0000]*$"}
            ),
        },
        "params": {
            "type": "object",
            "maxProperties": 100,
            "additionalProperties": or_secret(
                {
                    "type": ["string", "number", "boolean", "array"],
                    "maxItems": 100,
                    "items": or_secret(_SCALAR),
                }
            ),
        },
        "json": {"description": "Sent as the JSON body; secret references inside are resolved."},
        "body": or_secret(_STRING | {"description": "Sent as the raw body (UTF-8)."}),
        "auth": {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {
                "type": {"enum": ["bearer", "basic"]},
                "token": or_secret(_STRING),
                "username": or_secret(_STRING),
                "password": or_secret(_STRING),
            },
            "allOf": [
                {
                    "if": {"required": ["type"], "properties": {"type": {"const": "bearer"}}},
                    "then": {"required": ["token"]},
                },
                {
                    "if": {"required": ["type"], "properties": {"type": {"const": "basic"}}},
                    "then": {"required": ["username", "password"]},
                },
            ],
        },
        "timeout_s": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "Connect and read timeout (default QW_HTTP_TIMEOUT_S).",
        },
        "expected_status": {
            "if": {"type": "array"},
            "then": {"minItems": 1, "maxItems": 100, "items": _STATUS},
            "else": _STATUS,
            "description": "A status or a list of them (default: any 2xx).",
        },
        "retry_on_status": {"type": "array", "maxItems": 100, "items": _STATUS},
        "follow_redirects": {"type": "boolean", "default": True},
        "max_response_bytes": {"type": "integer", "minimum": 0},
    },
}


def validate_payload(payload: Any) -> list[tuple[str, str]]:
    """Cross-field rules and limits from settings (runs once the schema is satisfied)."""
    problems: list[tuple[str, str]] = []
    if "json" in payload and "body" in payload:
        problems.append(("body", "give json or body, not both"))
    url = payload["url"]
    if isinstance(url, str):
        message = check_url(url, parse_allowed_hosts(settings.QW_HTTP_ALLOWED_HOSTS))
        if message is not None:
            problems.append(("url", message))
    for name in payload.get("headers", {}):
        if name.lower() in FORBIDDEN_HEADERS:
            problems.append((f"headers.{name}", "set by the HTTP client; it cannot be given"))
    auth = payload.get("auth")
    if auth is not None:
        unused = {"bearer": ("username", "password"), "basic": ("token",)}[auth["type"]]
        problems.extend(
            (f"auth.{name}", f"not used with type {auth['type']}")
            for name in unused
            if name in auth
        )
    timeout_s = payload.get("timeout_s")
    if timeout_s is not None and timeout_s > settings.QW_HTTP_MAX_TIMEOUT_S:
        problems.append(
            (
                "timeout_s",
                f"{timeout_s} is greater than the maximum of {settings.QW_HTTP_MAX_TIMEOUT_S} "
                "(QW_HTTP_MAX_TIMEOUT_S)",
            )
        )
    cap = payload.get("max_response_bytes")
    if cap is not None and cap > settings.QW_HTTP_MAX_RESPONSE_BYTES:
        problems.append(
            (
                "max_response_bytes",
                f"{cap} is greater than the maximum of {settings.QW_HTTP_MAX_RESPONSE_BYTES} "
                "(QW_HTTP_MAX_RESPONSE_BYTES)",
            )
        )
    if "json" in payload:
        problems.extend(secrets.ref_problems(payload["json"], "json"))
    problems.extend(secrets.binding_problems(payload))
    return problems


def task_problems(payload: Any, *, timeout_s: int) -> list[tuple[str, str]]:
    """The rule that needs the task's own fields: the request's ``timeout_s`` must
    not exceed the task's. Checked at create (and for a workflow step, when its definition is
    written); the worker also takes the smaller of the two."""
    value = payload.get("timeout_s") if isinstance(payload, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > timeout_s:
        return [("timeout_s", f"{value} is greater than the task's own timeout_s ({timeout_s})")]
    return []


@register(
    TaskType.HTTP_REQUEST,
    schema=SCHEMA,
    extra_validator=validate_payload,
    task_validator=task_problems,
    io_bound=True,  # bounded by its own deadline below, so it may run in a pool thread
)
def http_request(ctx: Context, payload: dict[str, Any]) -> dict[str, Any]:
    """Make one HTTP request (any method, headers, params, JSON or raw body, bearer or basic
    auth) to a URL the SSRF guard allows; retry connection errors, timeouts and
    ``retry_on_status``; return ``{status_code, headers, json | text, elapsed_ms, truncated}``."""
    deadline = time.monotonic() + ctx.timeout_s  # the task's time limit, from its start
    method = payload.get("method", "GET")
    records = method in WITH_EFFECTS
    if records and ctx.attempt > 1:
        recorded = recorded_response(ctx.task_id)
        if recorded is not None:
            return _replay(ctx, recorded)
    bound = secrets.bindings(payload)
    hidden = secrets.is_ref(payload["url"])
    _check_bindings(bound, payload["url"], hidden=hidden)  # before any secret is read
    credentials: list[str] = []
    try:
        resolved = secrets.resolve(payload, credentials)
    except secrets.MissingSecret as exc:
        raise PermanentError(str(exc)) from None
    if hidden:
        _check_bindings(bound, resolved["url"], hidden=True)
    out = _outgoing(ctx, resolved, credentials)
    out.secret_bindings = bound
    out.deadline = deadline
    with redaction.scrubbing(credentials):
        incoming = _exchange(ctx, out)
        try:
            result = _result(incoming)
            _check_status(incoming, payload, method)
        except PermanentError as exc:
            if records:
                _record(ctx, incoming, method, {"outcome": "failed", "error": str(exc)})
            raise
        if records:
            _record(ctx, incoming, method, {"outcome": "completed", "result": result})
        return result


# --- the request -------------------------------------------------------------------------------


def _check_bindings(bound: tuple[secrets.Binding, ...], url: Any, *, hidden: bool) -> None:
    """Refuse a secret that is not bound to ``url``'s host (a reference: only check that every
    secret has a list). ``hidden``: the URL came from a secret, so its host is not named."""
    target = None
    if isinstance(url, str):
        try:
            target = parse_target(url)
        except ValueError:
            pass  # the client reports the URL
    reason = secrets.refusal(bound, target, "the URL's host" if hidden else None)
    if reason is not None:
        raise PermanentError(reason)


def _outgoing(ctx: Context, payload: dict[str, Any], credentials: list[str]) -> client.Outgoing:
    """The request to send, from a payload whose secrets are resolved.

    ``credentials`` gains the request's literal credentials as well, so that they are
    scrubbed like secrets; headers holding them are dropped on a cross-origin redirect.
    """
    headers = {str(k): str(v) for k, v in payload.get("headers", {}).items()}
    private = {
        name
        for name, value in headers.items()
        if name.lower() in redaction.SENSITIVE_NAMES or value in credentials
    }
    credentials.extend(headers[name] for name in private)
    if not any(name.lower() == IDEMPOTENCY_HEADER.lower() for name in headers):
        headers[IDEMPOTENCY_HEADER] = f"qw-{ctx.task_id}"
    auth: Any = None
    spec = payload.get("auth")
    if spec is not None and spec["type"] == "bearer":
        headers["Authorization"] = f"Bearer {spec['token']}"
        credentials.append(spec["token"])
    elif spec is not None:
        auth = (spec["username"], spec["password"])
        credentials.extend([spec["username"], spec["password"]])
    url = payload["url"]
    userinfo = requests.utils.get_auth_from_url(url)
    credentials.extend(part for part in userinfo if part)
    timeout_s = min(float(payload.get("timeout_s", settings.QW_HTTP_TIMEOUT_S)), ctx.timeout_s)
    return client.Outgoing(
        method=payload.get("method", "GET"),
        url=url,
        headers=headers,
        params={k: _param(v) for k, v in payload.get("params", {}).items()},
        json=payload.get("json"),
        has_json="json" in payload,
        body=payload.get("body"),
        auth=auth,
        timeout_s=timeout_s,
        follow_redirects=payload.get("follow_redirects", True),
        max_redirects=settings.QW_HTTP_MAX_REDIRECTS,
        max_bytes=payload.get("max_response_bytes", settings.QW_HTTP_RESPONSE_BYTES),
        private_headers=frozenset(private),
    )


def _param(value: Any) -> Any:
    if isinstance(value, list):
        return [_param(item) for item in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _exchange(ctx: Context, out: client.Outgoing) -> client.Incoming:
    """One exchange; its failures become RetryableError or PermanentError with a safe message."""
    where = f"{out.method} {out.url}"
    try:
        http = client.session(settings.QW_HTTP_ALLOWED_HOSTS)
        return client.exchange(http, out, check_cancelled=ctx.check_cancelled)
    except client.DeadlineExceeded:
        # The task's own time limit: the worker records it as Celery's soft limit (retried
        # while retries remain, then FAILED with failure class ``timeout``).
        raise SoftTimeLimitExceeded(f"timed out after {ctx.timeout_s}s") from None
    except (DestinationRefused, secrets.SecretRefused) as exc:
        raise PermanentError(_safe(f"{where}: {exc}")) from None
    except (client.TooManyRedirects, client.BadRedirect) as exc:
        raise PermanentError(_safe(f"{where}: {exc}")) from None
    except requests.exceptions.SSLError as exc:  # a certificate will not fix itself
        raise PermanentError(_safe(f"{where}: TLS error: {exc}")) from None
    except requests.Timeout as exc:
        kind = "connect" if isinstance(exc, requests.ConnectTimeout) else "read"
        raise RetryableError(_safe(f"{where}: {kind} timeout after {out.timeout_s:g}s")) from None
    except (
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.ContentDecodingError,
    ) as exc:
        raise RetryableError(_safe(f"{where}: connection error: {_reason(exc)}")) from None
    except (requests.RequestException, ValueError) as exc:  # invalid URL, header, schema
        raise PermanentError(_safe(f"{where}: {type(exc).__name__}: {exc}")) from None


def _reason(exc: Exception) -> str:
    """The cause of a requests error, without urllib3's "Max retries exceeded" wrapper."""
    inner: Any = exc.args[0] if exc.args and isinstance(exc.args[0], Exception) else exc
    reason = getattr(inner, "reason", None)  # urllib3's MaxRetryError carries the cause
    return str(reason if isinstance(reason, Exception) else inner)


def _safe(message: str) -> str:
    return redaction.redact_text(message)


# --- the response ------------------------------------------------------------------------------


def _text(incoming: client.Incoming) -> str:
    text = incoming.body.decode(incoming.encoding or "utf-8", errors="replace")
    return text.replace("\x00", "\ufffd")  # PostgreSQL's jsonb cannot store NUL


def _result(incoming: client.Incoming) -> dict[str, Any]:
    result: dict[str, Any] = {
        "status_code": incoming.status_code,
        "headers": redaction.redact(dict(incoming.headers)),
        "elapsed_ms": round(incoming.elapsed_ms, 1),
        "truncated": incoming.truncated,
        "url": redaction.redact_text(incoming.url),
        "redirects": incoming.redirects,
    }
    content_type = incoming.headers.get("Content-Type", "").split(";")[0].strip().lower()
    is_json = content_type == "application/json" or content_type.endswith("+json")
    if is_json and incoming.body and not incoming.truncated:
        try:
            parsed = json.loads(incoming.body.decode(incoming.encoding or "utf-8"))
            result["json"] = redaction.scrub_values(_without_nul(parsed))
            return result
        except ValueError:
            pass  # malformed: shown as text
    result["text"] = redaction.scrub(_text(incoming))
    return result


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _check_status(incoming: client.Incoming, payload: dict[str, Any], method: str) -> None:
    status = incoming.status_code
    expected = payload.get("expected_status")
    if expected is None:
        if 200 <= status < 300:
            return
    elif status == expected or (isinstance(expected, list) and status in expected):
        return
    excerpt = " ".join(_text(incoming)[: EXCERPT_CHARS * 2].split())[:EXCERPT_CHARS]
    message = _safe(
        f"HTTP {status} {incoming.reason} from {method} {incoming.url}"
        + (f": {excerpt}" if excerpt else "")
    )
    if status in payload.get("retry_on_status", DEFAULT_RETRY_ON_STATUS):
        raise RetryableError(message, retry_after=retry_after(incoming.headers.get("Retry-After")))
    raise PermanentError(message)


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# --- at most once ------------------------------------------------------------------------------


def _record(ctx: Context, incoming: client.Incoming, method: str, outcome: dict[str, Any]) -> None:
    """Write the final outcome down before returning it: a later attempt replays it."""
    ctx.log(
        RECORDED_EVENT,
        _safe(f"HTTP {incoming.status_code} from {method} {incoming.url}"),
        {**outcome, "status_code": incoming.status_code},
    )


def recorded_response(task_id: Any) -> dict[str, Any] | None:
    """The outcome an earlier attempt recorded, unless the task was retried by hand since."""
    row = (
        TaskLog.objects.filter(task_id=task_id, event__in=(RECORDED_EVENT, REQUEUED_EVENT))
        .order_by("-id")
        .values_list("event", "data")
        .first()
    )
    if row is None or row[0] != RECORDED_EVENT:
        return None
    data: dict[str, Any] = row[1]
    return data


def _replay(ctx: Context, recorded: dict[str, Any]) -> dict[str, Any]:
    ctx.log(
        REUSED_EVENT,
        f"response recorded by attempt {recorded.get('attempt')} reused; not requested again",
        {"recorded_attempt": recorded.get("attempt"), "status_code": recorded.get("status_code")},
    )
    if recorded.get("outcome") == "completed":
        result: dict[str, Any] = recorded["result"]
        return result
    raise PermanentError(str(recorded.get("error", "failed (recorded by an earlier attempt)")))


__all__ = [
    "SCHEMA",
    "http_request",
    "recorded_response",
    "retry_after",
    "task_problems",
    "validate_payload",
]
