"""The pooled ``requests.Session`` of a worker process, and one guarded exchange over it.

One session per process (made lazily after the prefork, remade if the allow-list changes):
connections to a host are kept alive and reused by the next task. ``trust_env`` is off (no
proxies, netrc or CA bundle from the environment) and cookies are never kept, so one task
cannot see another's. Redirects are followed here, hop by hop, not by requests: each hop is a
new request through the guarded transport, credentials are dropped when the origin changes,
and the chain is capped. A request that carries a ``{"$secret": NAME}`` is checked against
each secret's binding before it is sent and at every hop, and never follows a redirect to
another origin: the secret may be in its URL, headers or body, and a 307/308 would resend the
body too. The body is streamed and cut at the cap.
"""

from __future__ import annotations

import codecs
import os
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

from tasks_app.http import secrets
from tasks_app.http.guard import Guard, Target, parse_allowed_hosts, parse_target
from tasks_app.http.transport import GuardedAdapter

CHUNK_BYTES = 64 * 1024
DRAIN_BYTES = 64 * 1024  # read of a redirect's body to keep its connection reusable
CANCEL_CHECK_S = 1.0
USER_AGENT = f"QueueWorker/0.1 python-requests/{requests.__version__}"
_BODY_HEADERS = ("Content-Type", "Content-Length", "Transfer-Encoding")

_lock = threading.Lock()
_session: tuple[int, tuple[str, ...], requests.Session] | None = None


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
    """This process's session (a forked child makes its own: sockets must not be shared)."""
    global _session
    key = tuple(allowed_hosts)
    current = _session
    if current is not None and current[0] == os.getpid() and current[1] == key:
        return current[2]
    with _lock:
        if _session is not None and _session[0] == os.getpid():
            _session[2].close()
        made = make_session(Guard(allowed=parse_allowed_hosts(allowed_hosts)))
        _session = (os.getpid(), key, made)
        return made


def exchange(
    http: requests.Session,
    out: Outgoing,
    *,
    check_cancelled: Callable[[], None] | None = None,
) -> Incoming:
    """Send ``out``, follow its redirects, read the body up to the cap.

    Raises what requests raises (connection errors, timeouts), ``DestinationRefused`` from the
    guard, ``SecretRefused``, ``TooManyRedirects`` or ``BadRedirect``.
    """
    started = time.perf_counter()
    response, hops = open_response(http, out)
    try:
        body, truncated = _read_capped(response, out.max_bytes, check_cancelled)
    finally:
        response.close()  # a fully read body returns its connection to the pool
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
    timeout = (out.timeout_s, out.timeout_s)
    hops = 0
    while True:
        response = http.send(prepared, stream=True, timeout=timeout, allow_redirects=False)
        if not (out.follow_redirects and response.is_redirect):
            break
        if hops >= out.max_redirects:
            response.close()
            raise TooManyRedirects(f"more than {out.max_redirects} redirects")
        hops += 1
        try:
            prepared = _next_hop(http, prepared, response, out)
        finally:
            _release(response)
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


def _release(response: requests.Response) -> None:
    """Read a little of a body we do not need, so its connection can serve the next hop."""
    read = 0
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            read += len(chunk)
            if read > DRAIN_BYTES:
                break
    except requests.RequestException:
        pass
    response.close()


def _read_capped(
    response: requests.Response, cap: int, check_cancelled: Callable[[], None] | None
) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    next_check = time.monotonic() + CANCEL_CHECK_S
    for chunk in response.iter_content(CHUNK_BYTES):
        if size + len(chunk) > cap:
            chunks.append(chunk[: cap - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if check_cancelled is not None and time.monotonic() >= next_check:
            check_cancelled()
            next_check = time.monotonic() + CANCEL_CHECK_S
    return b"".join(chunks), False
