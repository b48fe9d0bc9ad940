"""The SSRF guard's policy: which destinations an ``HTTP_REQUEST`` task may reach.

In the manner of Stripe's Smokescreen and Advocate:

1. A URL's host is read with urllib3's parser, the one ``requests`` itself uses, so the host
   that is checked is the host that would be connected to.
2. A host listed in ``QW_HTTP_ALLOWED_HOSTS`` (``host`` or ``host:port``) is allowed as it is.
3. Otherwise every address the host resolves to must be public: ``refusal_reason`` refuses
   loopback, private, link-local, multicast, reserved and unspecified addresses, CGNAT
   (100.64/10), the cloud metadata addresses, the whole local-use NAT64 prefix
   (64:ff9b:1::/48, whose translators are private by definition), and IPv6 addresses that embed
   such an IPv4 (IPv4-mapped, 6to4, well-known NAT64, Teredo), which the network would deliver
   to that IPv4.
4. A refusal names the address only when the URL wrote it literally: the address a name
   resolves to is the internal network's layout, which is for the operator's log, not for the
   task's error.
5. IPv4 literals are read the way the C resolver (``inet_aton``) reads them: ``2130706433``,
   ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` all mean 127.0.0.1, so they are checked as such.

``check_url`` applies this to a literal address when a task is created; the transport
(``tasks_app.http.transport``) applies ``Guard.resolve`` when it opens a connection, and
connects to the very addresses it checked.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_LENGTH = 8192

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_METADATA = {
    ipaddress.ip_address("169.254.169.254"): "a cloud metadata address",
    ipaddress.ip_address("fd00:ec2::254"): "a cloud metadata address",
}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: frozenset(string.hexdigits)}


class DestinationRefused(Exception):
    """The guard refused a destination; no connection was attempted."""


# --- addresses ---------------------------------------------------------------------------------


def parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """``text`` as ``inet_aton`` reads it (the C resolver's rule), or None if it is no IPv4.

    One to four parts separated by dots; each part is hexadecimal after ``0x``, octal after a
    leading ``0``, decimal otherwise; the last part fills the bytes that are left, so ``127.1``
    is 127.0.0.1 and ``2130706433`` is 127.0.0.1 as well.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers: list[int] = []
    for part in parts:
        if part[:2] in ("0x", "0X"):
            digits, base = part[2:], 16
        elif len(part) > 1 and part[0] == "0":
            digits, base = part[1:], 8
        else:
            digits, base = part, 10
        if not digits or not set(digits) <= _DIGITS[base]:
            return None
        numbers.append(int(digits, base))
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host names literally (IPv6 with or without brackets, any IPv4 spelling)."""
    host = host.strip().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])  # drop a zone id
        except ValueError:
            return None
        return address
    return parse_ipv4(host)


def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` must not be connected to, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return f"{address} is a local-use NAT64 address ({_NAT64_LOCAL})"
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            kind, ipv4s = embedded
            for ipv4 in ipv4s:
                inner = refusal_reason(ipv4)
                if inner is not None:
                    return f"{address} is {kind} address of {ipv4}, {inner.split(' is ', 1)[1]}"
            return None
    if address in _METADATA:
        return f"{address} is {_METADATA[address]}"
    for test, what in (
        (address.is_unspecified, "an unspecified"),
        (address.is_loopback, "a loopback"),
        (address.is_link_local, "a link-local"),
        (address.is_multicast, "a multicast"),
        (address in _CGNAT, "a carrier-grade NAT (100.64.0.0/10)"),
        (address.is_reserved, "a reserved"),
        (address.is_private, "a private"),
        (not address.is_global, "a non-public"),
    ):
        if test:
            return f"{address} is {what} address"
    return None


def _embedded_ipv4(
    address: ipaddress.IPv6Address,
) -> tuple[str, list[ipaddress.IPv4Address]] | None:
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped", [address.ipv4_mapped]
    if address.sixtofour is not None:
        return "a 6to4", [address.sixtofour]
    if address.teredo is not None:
        server, client = address.teredo
        return "a Teredo", [client, server]
    if address in _NAT64:
        return "a NAT64", [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        return "an IPv4-compatible", [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return None


# --- hosts -------------------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no brackets; an IP literal in its canonical spelling; an
    internationalised name in its IDNA (``xn--``) form, as urllib3 writes it in a request.

    ValueError if a non-ASCII name is no valid IDNA name.
    """
    host = host.strip().lower().rstrip(".")
    literal = parse_ip_literal(host)
    if literal is not None:
        return str(literal)
    host = host.strip("[]")
    if not host.isascii():
        try:
            encoded = parse_url(f"http://{host}/").host
        except LocationParseError:
            raise ValueError(f"{host!r} is not a valid internationalised host name") from None
        host = encoded or host
    return host


@dataclass(frozen=True)
class AllowedHost:
    host: str  # normalised
    port: int | None = None  # None: any port

    def matches(self, host: str, port: int) -> bool:
        return self.host == host and (self.port is None or self.port == port)

    def __str__(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port is None else f"{shown}:{self.port}"


def parse_allowed_hosts(entries: Iterable[str]) -> tuple[AllowedHost, ...]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6; ValueError if malformed."""
    allowed: list[AllowedHost] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        host, port_text, has_port = entry, "", False
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"{raw!r}: expected [ipv6] or [ipv6]:port")
            port_text, has_port = rest[1:], bool(rest)
        elif entry.count(":") == 1:  # more than one colon: a bare IPv6 address
            host, port_text = entry.split(":")
            has_port = True
        port: int | None = None
        if has_port:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ValueError(f"{raw!r}: the port must be a number from 1 to 65535")
            port = int(port_text)
        if not host or "/" in host or "@" in host or " " in host:
            raise ValueError(f"{raw!r}: expected host or host:port")
        allowed.append(AllowedHost(normalize_host(host), port))
    return tuple(allowed)


def is_allowed(host: str, port: int, allowed: Sequence[AllowedHost]) -> bool:
    try:
        normalized = normalize_host(host)
    except ValueError:
        return False
    return any(entry.matches(normalized, port) for entry in allowed)


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as urllib3 reads it (lower case; brackets kept for IPv6)
    port: int

    @property
    def origin(self) -> tuple[str, str, int]:
        """Scheme, host and port: what a redirect must keep to stay with the same server."""
        return self.scheme, normalize_host(self.host), self.port

    def __str__(self) -> str:
        """``host``, or ``host:port`` when the port is not the scheme's default."""
        return self.host if self.port == DEFAULT_PORTS[self.scheme] else f"{self.host}:{self.port}"


def parse_target(url: str) -> Target:
    """Scheme, host and port of ``url`` as requests will read them; ValueError if unusable."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = parse_url(url)
    except LocationParseError:
        raise ValueError("Enter a valid URL.") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in SCHEMES:
        raise ValueError("only http and https URLs are allowed")
    if not parsed.host:
        raise ValueError("Enter a valid URL (it has no host).")
    return Target(scheme, parsed.host, parsed.port or DEFAULT_PORTS[scheme])


def check_url(url: str, allowed: Sequence[AllowedHost]) -> str | None:
    """What is wrong with ``url`` without resolving names (create time), or None.

    A literal address (in any spelling) that the guard refuses is refused here; a name is
    checked when the request is made, on the addresses it resolves to.
    """
    try:
        target = parse_target(url)
    except ValueError as exc:
        return str(exc)
    if is_allowed(target.host, target.port, allowed):
        return None
    literal = parse_ip_literal(target.host)
    if literal is not None:
        reason = refusal_reason(literal)
        if reason is not None:
            return f"refused: {reason} (see QW_HTTP_ALLOWED_HOSTS)"
    return None


# --- resolution --------------------------------------------------------------------------------

Resolver = Callable[..., list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Guard:
    """Resolves a host once and returns the addresses to connect to, all of them checked."""

    allowed: tuple[AllowedHost, ...] = ()
    resolver: Resolver = socket.getaddrinfo
    refuse: Callable[[IPAddress], str | None] = refusal_reason

    def resolve(
        self, host: str, port: int, family: int = socket.AF_UNSPEC
    ) -> list[tuple[Any, ...]]:
        """``getaddrinfo`` results for ``host``; DestinationRefused if any address is refused.

        Every address must pass, not only the first: a name that mixes a public and a private
        address would otherwise reach the private one on a retry or a happy-eyeballs fallback.
        """
        bare = host.strip("[]")
        results = self.resolver(bare, port, family, socket.SOCK_STREAM)
        if is_allowed(host, port, self.allowed):
            return list(results)
        for result in results:
            sockaddr = result[4]
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            reason = self.refuse(address)
            if reason is None:
                continue
            if parse_ip_literal(host) != address:
                logger.warning(
                    "refused %s:%s, which resolves to %s: %s", host, port, address, reason
                )
                reason = f"{host} resolves to a private or reserved address"
            raise DestinationRefused(
                f"refused to connect to {host}:{port}: {reason} (see QW_HTTP_ALLOWED_HOSTS)"
            )
        return list(results)
