"""The pooled ``requests.Session`` of a worker thread, and one guarded exchange over it.

One session per thread of a worker process (made lazily after the prefork or when a pool
thread first runs a task, remade if the allow-list changes): connections to a host are kept
alive and reused by the next task on that thread, and no two threads share a connection pool
or a ``Session`` (which is not thread-safe). A worker process keeps at most about one
connection to a busy host per thread that runs HTTP tasks: ``QW_HTTP_CONCURRENCY`` for its pool
(``tasks_app.concurrent``), plus one per ``-P threads`` thread. ``trust_env`` is off (no
proxies, netrc or CA bundle from the environment) and cookies are never kept, so one task
cannot see another's. Redirects are followed here, hop by hop, not by requests: each hop is a
new request through the guarded transport, credentials are dropped when the origin changes,
and the chain is capped. A request that carries a ``{"$secret": NAME}`` is checked against
each secret's binding before it is sent and at every hop, and never follows a redirect to
another origin: the secret may be in its URL, headers or body, and a 307/308 would resend the
body too. The body is streamed and cut at the cap.

Time is bounded in total, not only per read: an exchange may be given a ``deadline`` (the
task's own time limit, which Celery cannot enforce under ``-P threads``). The connect and every
read of every hop wait at most the smaller of ``timeout_s`` and the time left, the body is read
a piece at a time (one ``recv`` each, never "until 64 KiB arrived"), and ``DeadlineExceeded`` is
raised once the time is up: a server that trickles bytes forever is cut off at the deadline.
"""

from __future__ import annotations

import codecs
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.structures import CaseInsensitiveDict
from requests.utils import requote_uri
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError
from urllib3.exceptions import SSLError as Urllib3SSLError

from tasks_app.http import secrets
from tasks_app.http.guard import Guard, Target, parse_allowed_hosts, parse_target
from tasks_app.http.transport import GuardedAdapter

CHUNK_BYTES = 64 * 1024
DRAIN_BYTES = 64 * 1024  # read of a redirect's body to keep its connection reusable
CANCEL_CHECK_S = 1.0
# A timeout this close to the deadline is the deadline's (a socket timeout may fire a little
# early against the monotonic clock).
DEADLINE_SLACK_S = 0.05
USER_AGENT = f"QueueWorker/0.1 python-requests/{requests.__version__}"
_BODY_HEADERS = ("Content-Type", "Content-Length", "Transfer-Encoding")

_local = threading.local()


class DeadlineExceeded(requests.Timeout):
    """The exchange used up the total time it was given (``Outgoing.deadline``)."""


class TooManyRedirects(requests.TooManyRedirects):
    pass


class BadRedirect(requests.exceptions.InvalidURL):
    pass


@dataclass
class Outgoing:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] | None = None
    json: Any = None
    has_json: bool = False
    body: str | None = None
    auth: Any = None  # a requests auth object or (username, password)
    timeout_s: float = 30.0
    follow_redirects: bool = True
    max_redirects: int = 5
    max_bytes: int = 1024 * 1024
    # Header names dropped when a redirect leaves the origin (credentials, secrets).
    private_headers: frozenset[str] = frozenset()
    # The bindings of the secrets the request carries (anywhere: URL, headers, body).
    secret_bindings: tuple[secrets.Binding, ...] = ()
    # ``time.monotonic()`` by which the whole exchange (every hop, the body) must be over.
    deadline: float | None = None

    def wait_s(self) -> float:
        """How long the next connect or read may wait: ``timeout_s``, or less near the deadline.
        Raises ``DeadlineExceeded`` when no time is left."""
        if self.deadline is None:
            return self.timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"no time left of the deadline ({self.timeout_s:g}s a read)")
        return min(self.timeout_s, left)

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline - DEADLINE_SLACK_S


@dataclass
class Incoming:
    status_code: int
    reason: str
    url: str
    headers: CaseInsensitiveDict[str]
    body: bytes
    truncated: bool
    elapsed_ms: float
    redirects: int
    encoding: str | None


def make_session(guard: Guard) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keep no cookies
    session.headers["User-Agent"] = USER_AGENT
    adapter = GuardedAdapter(guard, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def session(allowed_hosts: list[str]) -> requests.Session:
    """This thread's session (a forked child or another thread makes its own: sockets and
    pools are never shared). It is dropped with its thread, which closes its connections."""
    key = (os.getpid(), tuple(allowed_hosts))
    current: tuple[tuple[int, tuple[str, ...]], requests.Session] | None = getattr(
        _local, "session", None
    )
    if current is not None and current[0] == key:
        return current[1]
    if current is not None and current[0][0] == os.getpid():
        current[1].close()
    made = make_session(Guard(allowed=parse_allowed_hosts(allowed_hosts)))
    _local.session = (key, made)
    return made


def exchange(
    http: requests.Session,
    out: Outgoing,
    *,
    check_cancelled: Callable[[], None] | None = None,
) -> Incoming:
    """Send ``out``, follow its redirects, read the body up to the cap.

    Raises what requests raises (connection errors, timeouts), ``DeadlineExceeded``,
    ``DestinationRefused`` from the guard, ``SecretRefused``, ``TooManyRedirects`` or
    ``BadRedirect``.
    """
    started = time.perf_counter()
    response, hops = open_response(http, out)
    try:
        body, truncated = _read_capped(response, out, out.max_bytes, check_cancelled)
    finally:
        response.close()  # a fully read body has returned its connection to the pool
    return Incoming(
        status_code=response.status_code,
        reason=response.reason or "",
        url=response.url,
        headers=response.headers,
        body=body,
        truncated=truncated,
        elapsed_ms=(time.perf_counter() - started) * 1000,
        redirects=hops,
        encoding=charset(response.headers.get("Content-Type", "")),
    )


def open_response(http: requests.Session, out: Outgoing) -> tuple[requests.Response, int]:
    """Send ``out`` and follow its redirects; return the final response, its body unread
    (the caller reads and closes it), and the number of hops."""
    _check_secrets(out, parse_target(out.url))  # as the guard will read it (ValueError)
    request = requests.Request(
        out.method,
        out.url,
        headers=out.headers,
        params=dict(out.params or {}),
        data=out.body.encode() if out.body is not None else None,
        json=out.json if out.has_json else None,
        auth=out.auth,
    )
    prepared = http.prepare_request(request)
    hops = 0
    while True:
        wait = out.wait_s()
        try:
            response = http.send(prepared, stream=True, timeout=(wait, wait), allow_redirects=False)
        except requests.Timeout as exc:
            if out.past_deadline():
                raise DeadlineExceeded(str(exc)) from exc
            raise
        if not (out.follow_redirects and response.is_redirect):
            break
        if hops >= out.max_redirects:
            response.close()
            raise TooManyRedirects(f"more than {out.max_redirects} redirects")
        hops += 1
        try:
            prepared = _next_hop(http, prepared, response, out)
        finally:
            _release(response, out)
    return response, hops


def charset(content_type: str) -> str | None:
    """The ``charset`` a Content-Type names, if Python knows it (else the caller's default)."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            try:
                return codecs.lookup(value.strip().strip("'\"")).name
            except LookupError:
                return None
    return None


def _next_hop(
    http: requests.Session,
    prepared: requests.PreparedRequest,
    response: requests.Response,
    out: Outgoing,
) -> requests.PreparedRequest:
    """The request for the redirect's target (requests' own rules, guard-checked per hop)."""
    location = http.get_redirect_target(response) or ""
    previous = response.url
    if location.startswith("//"):
        location = f"{urlsplit(previous).scheme}:{location}"
    url = requote_uri(urljoin(previous, location))
    try:
        target = parse_target(url)
    except ValueError as exc:
        raise BadRedirect(f"redirect to {url!r} refused: {exc}") from None
    origin = parse_target(previous)
    if out.secret_bindings and target.origin != origin.origin:
        names = ", ".join(binding.name for binding in out.secret_bindings)
        plural = "s" if len(out.secret_bindings) > 1 else ""
        raise secrets.SecretRefused(  # the origin left is not named: it may be a secret URL's
            f"redirect to another origin ({_origin(target)}) not followed: "
            f"the request carries secret{plural} {names}, sent to its own origin only"
        )
    _check_secrets(out, target)
    nxt = prepared.copy()
    nxt.url = url
    method = (nxt.method or "GET").upper()
    status = response.status_code
    if (status in (302, 303) and method != "HEAD") or (status == 301 and method == "POST"):
        nxt.method = "GET"
        nxt.body = None
        for name in _BODY_HEADERS:
            nxt.headers.pop(name, None)
    if http.should_strip_auth(previous, url):
        for name in {"Authorization", "Proxy-Authorization", "Cookie", *out.private_headers}:
            nxt.headers.pop(name, None)
    return nxt


def _check_secrets(out: Outgoing, target: Target) -> None:
    reason = secrets.refusal(out.secret_bindings, target)
    if reason is not None:
        raise secrets.SecretRefused(reason)


def _origin(target: Target) -> str:
    return f"{target.scheme}://{target.host}:{target.port}"


def _release(response: requests.Response, out: Outgoing) -> None:
    """Read a little of a body we do not need, so its connection can serve the next hop."""
    try:
        _read_capped(response, out, DRAIN_BYTES, None)
    except DeadlineExceeded:
        response.close()
        raise
    except requests.RequestException:
        pass
    response.close()


def _read_capped(
    response: requests.Response,
    out: Outgoing,
    cap: int,
    check_cancelled: Callable[[], None] | None,
) -> tuple[bytes, bool]:
    """The body, up to ``cap`` bytes (and whether it was cut). Each read takes what one
    ``recv`` brings, waiting at most ``out.wait_s()``; a body read to its end returns the
    connection to the pool, a cut one is closed by the caller."""
    raw = response.raw
    chunks: list[bytes] = []
    size = 0
    next_check = time.monotonic() + CANCEL_CHECK_S
    while True:
        chunk = _read1(raw, out)
        if not chunk:
            break
        if size + len(chunk) > cap:
            chunks.append(chunk[: cap - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if check_cancelled is not None and time.monotonic() >= next_check:
            check_cancelled()
            next_check = time.monotonic() + CANCEL_CHECK_S
    raw.release_conn()
    return b"".join(chunks), False


def _read1(raw: Any, out: Outgoing) -> bytes:
    """One read of the body, with the errors requests' ``iter_content`` would raise (a
    timeout as ``ReadTimeout``, or ``DeadlineExceeded`` when the deadline caused it)."""
    wait = out.wait_s()
    connection = getattr(raw, "connection", None)
    sock: socket.socket | None = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(wait)
    try:
        data: bytes = raw.read1(CHUNK_BYTES, decode_content=True)
    except ReadTimeoutError as exc:
        if out.past_deadline():
            raise DeadlineExceeded(str(exc)) from exc
        raise requests.ReadTimeout(exc) from exc
    except ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except Urllib3SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    return data or b""
