"""A scriptable loopback HTTP server and a connection counter, for the tests and ``make bench``.

``LoopbackServer`` runs the standard library's ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive)
in a thread. It records every request (method, path, query, headers, body), counts the TCP
connections it accepts, and answers from a script per path: one ``Reply`` or a list of them
(the last one repeats), or a function of the request. Unscripted paths echo the request back
as JSON. ``Listener`` is a bare listening socket that only counts the connections that reach
it: the witness that a refused destination saw no packet.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | str | None = None
    json: Any = None
    delay_s: float = 0.0  # before the status line (a slow server: the client's read timeout)
    # > 0: after the headers, announce a huge body and send it one byte per ``trickle_s``
    # until the client hangs up (a server that never finishes: the task's total deadline).
    trickle_s: float = 0.0


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    connection: int  # which accepted connection carried it (1, 2, …)
    at: float = 0.0  # time.monotonic() when it arrived

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


Script = Reply | list[Reply] | Callable[[Received], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: LoopbackServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner._accepted(sock)
        return sock, address


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # status line, headers and body leave in one write
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests look at ``requests`` instead

    def _handle(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        received = Received(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=dict(self.headers.items()),
            body=body,
            connection=owner._connection_of(self.connection),
            at=time.monotonic(),
        )
        owner._record(received)
        reply = owner._reply_for(received)
        if reply.delay_s:
            time.sleep(reply.delay_s)
        payload = _body_of(reply, received)
        self.send_response(reply.status)
        if reply.trickle_s:
            self._trickle(reply.trickle_s)
            return
        headers = {"Content-Length": str(len(payload)), **reply.headers}
        if reply.json is not None or (reply.body is None and reply.status != 204):
            headers.setdefault("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _trickle(self, every_s: float) -> None:
        self.send_header("Content-Length", str(2**40))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            while True:
                time.sleep(every_s)
                self.wfile.write(b".")
                self.wfile.flush()
        except OSError:
            self.wfile = io.BytesIO()  # the client hung up: nothing left to flush

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


def _body_of(reply: Reply, received: Received) -> bytes:
    if reply.json is not None:
        return json.dumps(reply.json).encode()
    if isinstance(reply.body, str):
        return reply.body.encode()
    if reply.body is not None:
        return reply.body
    if reply.status in (204, 304):
        return b""
    return json.dumps(
        {
            "method": received.method,
            "path": received.path,
            "query": received.query,
            "headers": received.headers,
            "body": received.body.decode("utf-8", errors="replace"),
        }
    ).encode()


class LoopbackServer:
    """``with LoopbackServer() as server: server.url("/x")`` — see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, Script] = {}
        self._served: dict[str, int] = {}
        self._connections: dict[int, int] = {}
        self.requests: list[Received] = []
        self.connections = 0
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        address = self._server.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self.netloc}{path}"

    def script(self, path: str, script: Script) -> None:
        with self._lock:
            self._scripts[path] = script
            self._served[path] = 0

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- called by the server's threads ---

    def _accepted(self, sock: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._connections[id(sock)] = self.connections

    def _connection_of(self, sock: Any) -> int:
        with self._lock:
            return self._connections.get(id(sock), 0)

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def _reply_for(self, received: Received) -> Reply:
        with self._lock:
            script = self._scripts.get(received.path)
            served = self._served.get(received.path, 0)
            self._served[received.path] = served + 1
        if script is None:
            return Reply()
        if isinstance(script, Reply):
            return script
        if isinstance(script, list):
            return script[min(served, len(script) - 1)]
        return script(received)


class Listener:
    """A listening socket that never answers; ``accepted()`` counts connections that reached it.

    The kernel completes a handshake into the backlog even if nobody calls ``accept``, so the
    count drains the backlog: any connection that got through is counted.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]
        self._count = 0

    def accepted(self) -> int:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return self._count
            self._count += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
