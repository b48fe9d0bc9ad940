"""A requests transport that connects only where the guard allows, to the address it checked.

``GuardedAdapter`` is a ``requests`` ``HTTPAdapter`` whose urllib3 connections open their
socket with ``Guard.resolve``: the host is resolved once, every address is checked, and the
socket connects to those same addresses. There is no second lookup between the check and the
connect, so DNS rebinding cannot slip a private address in (the approach of Advocate).
TLS still verifies the certificate for the host name: urllib3 takes SNI and the name to match
from the URL, not from the address. Every new connection is checked, including one opened for
a redirect; a pooled connection is reused only for the host and port it was checked for.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from tasks_app.http.guard import Guard


def connect(
    addresses: list[tuple[Any, ...]],
    timeout: Any,
    source_address: tuple[str, int] | None = None,
    socket_options: Any = None,
) -> socket.socket:
    """Connect to the first of ``addresses`` (``getaddrinfo`` results) that answers."""
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in addresses:
        sock = None
        try:
            sock = socket.socket(family, socktype, proto)
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            if sock is not None:
                sock.close()
    if error is not None:
        raise error
    raise OSError("getaddrinfo returned no addresses")


class _GuardedConnectionMixin:
    """``_new_conn`` of urllib3's ``HTTPConnection``, with the guard between lookup and connect."""

    guard: Guard
    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any
    _dns_host: str

    def _new_conn(self) -> socket.socket:
        try:
            addresses = self.guard.resolve(self._dns_host, self.port, allowed_gai_family())
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        try:
            sock = connect(addresses, self.timeout, self.source_address, self.socket_options)
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                self,
                f"Connection to {self.host} timed out. (connect timeout={self.timeout})",
            ) from exc
        except OSError as exc:
            raise NewConnectionError(
                self,  # type: ignore[arg-type]
                f"Failed to establish a new connection: {exc}",
            ) from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


class GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class GuardedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose every connection passes ``guard``; mount it for both schemes."""

    def __init__(self, guard: Guard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        guard = self.guard

        class HTTPConn(GuardedHTTPConnection):
            pass

        class HTTPSConn(GuardedHTTPSConnection):
            pass

        HTTPConn.guard = guard
        HTTPSConn.guard = guard

        class HTTPPool(HTTPConnectionPool):
            ConnectionCls = HTTPConn

        class HTTPSPool(HTTPSConnectionPool):
            ConnectionCls = HTTPSConn

        self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # A proxy would make the connection on our behalf, out of the guard's reach.
        raise ValueError("HTTP_REQUEST does not use proxies")
