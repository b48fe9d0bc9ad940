"""The SSRF guard: address policy, IPv4 spellings, allowed hosts, and the guarded transport."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import requests

from tasks_app.http import client, transport
from tasks_app.http.guard import (
    AllowedHost,
    DestinationRefused,
    Guard,
    check_url,
    is_allowed,
    parse_allowed_hosts,
    parse_ip_literal,
    parse_ipv4,
    parse_target,
    refusal_reason,
)
from tasks_app.http.testing import Listener, LoopbackServer

# --- addresses ---------------------------------------------------------------------------------

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "192.168.1.1": "private",
    "fc00::1": "private",
    "169.254.1.1": "link-local",
    "fe80::1": "link-local",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "240.0.0.1": "reserved",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    "169.254.169.254": "cloud metadata",
    "fd00:ec2::254": "cloud metadata",
    "::ffff:127.0.0.1": "IPv4-mapped address of 127.0.0.1, a loopback",
    "::ffff:169.254.169.254": "IPv4-mapped address of 169.254.169.254, a cloud metadata",
    "2002:7f00:1::1": "6to4 address of 127.0.0.1",
    "2002:a00:1::": "6to4 address of 10.0.0.1, a private",
    "64:ff9b::7f00:1": "NAT64 address of 127.0.0.1",
    "64:ff9b::a9fe:a9fe": "NAT64 address of 169.254.169.254, a cloud metadata",
    "64:ff9b:1::a00:1": "local-use NAT64 address (64:ff9b:1::/48)",
    # local-use NAT64 is refused whatever it embeds: its translator is on a private network
    "64:ff9b:1::808:808": "local-use NAT64 address (64:ff9b:1::/48)",
    "64:ff9b:1:ffff:ffff:ffff:ffff:ffff": "local-use NAT64",
    # Teredo: server 65.54.227.120, client 127.0.0.1 (stored inverted: 0x80ff_fffe)
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "Teredo address of 127.0.0.1",
    "::127.0.0.1": "IPv4-compatible address of 127.0.0.1",
    "198.18.0.1": "private",
}


@pytest.mark.parametrize(("address", "why"), sorted(REFUSED.items()))
def test_refusal_reason_refuses_non_public_addresses(address, why):
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None and why in reason, reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "2002:808:808::1", "64:ff9b::808:808"],
)
def test_refusal_reason_allows_public_addresses(address):
    # 6to4 and NAT64 forms of a public IPv4 are as public as it is
    assert refusal_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "0177.1",
        "127.1",
        "127.0.1",
        "017700000001",
        "0x7F.0.0.0x1",
        "00000177.1",
    ],
)
def test_parse_ipv4_reads_every_spelling_as_the_resolver_does(spelling):
    assert parse_ipv4(spelling) == ipaddress.IPv4Address("127.0.0.1")
    # the C resolver agrees (glibc's inet_aton, which getaddrinfo uses for numeric hosts)
    assert socket.inet_ntoa(socket.inet_aton(spelling)) == "127.0.0.1"


@pytest.mark.parametrize(
    "text",
    [
        "example.com",
        "1.2.3.4.5",
        "256.1.1.1",
        "0x",
        "0x.1",
        "09.1.1.1",
        "1e2.0.0.1",
        "4294967296",
        "",
        "1..1",
        "-1.0.0.1",
    ],
)
def test_parse_ipv4_rejects_what_the_resolver_rejects(text):
    assert parse_ipv4(text) is None
    with pytest.raises(OSError):
        socket.inet_aton(text)


def test_parse_ip_literal_handles_brackets_zones_and_trailing_dots():
    assert parse_ip_literal("[::1]") == ipaddress.ip_address("::1")
    assert parse_ip_literal("[fe80::1%eth0]") == ipaddress.ip_address("fe80::1")
    assert parse_ip_literal("127.0.0.1.") == ipaddress.ip_address("127.0.0.1")
    assert parse_ip_literal("localhost") is None


# --- allowed hosts -----------------------------------------------------------------------------


def test_parse_allowed_hosts_reads_names_ports_and_ipv6():
    allowed = parse_allowed_hosts(
        ["api.internal", "127.0.0.1:8080", "[::1]:9000", "[fd00::1]", "fd00::2", " Example.COM. "]
    )
    assert allowed == (
        AllowedHost("api.internal"),
        AllowedHost("127.0.0.1", 8080),
        AllowedHost("::1", 9000),
        AllowedHost("fd00::1"),
        AllowedHost("fd00::2"),
        AllowedHost("example.com"),
    )


def test_allowed_hosts_compare_internationalised_names_in_idna_form():
    allowed = parse_allowed_hosts(["Bücher.Example", "XN--FA-HIA.de:8443"])
    assert allowed == (AllowedHost("xn--bcher-kva.example"), AllowedHost("xn--fa-hia.de", 8443))
    assert is_allowed("BÜCHER.example", 80, allowed)
    assert is_allowed(parse_target("https://bücher.example/").host, 443, allowed)
    assert is_allowed(parse_target("https://faß.de:8443/").host, 8443, allowed)
    assert not is_allowed("faß.de", 443, allowed)


@pytest.mark.parametrize(
    "entry",
    ["host:", "host:0", "host:70000", "host:http", "[::1", "[::1]x", "http://host", "user@host"],
)
def test_parse_allowed_hosts_refuses_malformed_entries(entry):
    with pytest.raises(ValueError, match=r"expected|port"):
        parse_allowed_hosts([entry])


def test_check_url_refuses_literal_addresses_in_every_spelling():
    for url in [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1:8080/",
        "http://127.0.0.1./",
        "http://[::1]/",
        "http://[::ffff:7f00:1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://100.64.0.1/",
        "http://[64:ff9b::7f00:1]/",
        "http://[64:ff9b:1::808:808]/",
        "http://[2002:7f00:1::1]/",
        "http://user:pw@10.0.0.1/",
    ]:
        message = check_url(url, ())
        assert message is not None and message.startswith("refused:"), url


def test_check_url_allows_names_public_addresses_and_allowed_hosts():
    assert check_url("https://example.com/x", ()) is None
    assert check_url("http://localhost:8080/", ()) is None  # a name: checked when resolved
    assert check_url("http://8.8.8.8/", ()) is None
    allowed = parse_allowed_hosts(["127.0.0.1:8080"])
    assert check_url("http://127.0.0.1:8080/", allowed) is None
    assert check_url("http://2130706433:8080/", allowed) is None  # the same destination
    assert check_url("http://127.0.0.1:8081/", allowed) is not None  # another port


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("example.com", "only http and https"),
        ("http:///path", "no host"),
        ("http://exa mple.com/", "valid URL"),
        ("https://example.com:99999/", "valid URL"),
    ],
)
def test_check_url_refuses_what_is_not_an_http_url(url, message):
    assert message in (check_url(url, ()) or "")


# --- the guarded transport ---------------------------------------------------------------------


def _resolver(*answers: str, calls: list[str] | None = None):
    """A getaddrinfo that answers ``answers`` in turn (the last one repeats): DNS rebinding."""
    answered: list[str] = []

    def resolve(host, port, family=0, socktype=0, *args):
        if calls is not None:
            calls.append(host)
        address = answers[min(len(answered), len(answers) - 1)]
        answered.append(address)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    return resolve


def test_guard_refuses_a_name_if_any_of_its_addresses_is_refused():
    def both(host, port, *args):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
        ]

    with pytest.raises(DestinationRefused, match=r"mixed\.test:80.*private") as refused:
        Guard(resolver=both).resolve("mixed.test", 80)
    assert "mixed.test resolves to a private or reserved address" in str(refused.value)


def test_a_refused_name_does_not_reveal_the_address_it_resolves_to(caplog):
    # given a name that resolves to an internal address
    def internal(host, port, *args):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.20.30.40", port))]

    # when the guard refuses it
    with pytest.raises(DestinationRefused) as refused:
        Guard(resolver=internal).resolve("api.example.org", 443)

    # then the task's error says why without the address; the operator's log has it
    message = str(refused.value)
    assert "api.example.org resolves to a private or reserved address" in message
    assert "10.20.30.40" not in message
    assert "10.20.30.40" in caplog.text


def test_a_refused_literal_address_is_named():
    with pytest.raises(DestinationRefused, match=r"10\.0\.0\.1 is a private address"):
        Guard().resolve("10.0.0.1", 80)


def test_transport_refuses_before_any_packet_is_sent():
    with Listener("127.0.0.2") as listener:
        http = client.make_session(Guard())
        with pytest.raises(DestinationRefused, match="loopback"):
            http.get(f"http://127.0.0.2:{listener.port}/", timeout=2)
        assert listener.accepted() == 0


def test_transport_refuses_a_name_that_resolves_to_loopback():
    with Listener("127.0.0.1") as listener:
        http = client.make_session(Guard())
        with pytest.raises(DestinationRefused, match=r"localhost resolves to a private") as e:
            http.get(f"http://localhost:{listener.port}/", timeout=2)
        assert "127.0.0.1" not in str(e.value)
        assert listener.accepted() == 0


def test_transport_connects_to_the_address_it_checked_with_one_lookup():
    # given a rebinding resolver: first an address the policy accepts, then a refused one
    calls: list[str] = []
    with LoopbackServer() as server, Listener("127.0.0.3", server.port) as elsewhere:
        guard = Guard(
            resolver=_resolver("127.0.0.1", "127.0.0.3", calls=calls),
            refuse=lambda a: None if str(a) == "127.0.0.1" else "refused in this test",
        )
        http = client.make_session(guard)

        # when a request is made to the name
        response = http.get(f"http://rebind.test:{server.port}/x", timeout=2)

        # then it went to the address that was checked, after one lookup only
        assert response.status_code == 200
        assert calls == ["rebind.test"]
        assert server.received("/x")[0].header("Host") == f"rebind.test:{server.port}"
        assert elsewhere.accepted() == 0


def test_transport_allows_an_allowed_host_and_reuses_its_connection():
    with LoopbackServer() as server:
        http = client.make_session(Guard(allowed=parse_allowed_hosts([server.netloc])))
        for _ in range(5):
            assert http.get(server.url("/ok"), timeout=2).status_code == 200
        assert server.connections == 1
        assert len(server.received("/ok")) == 5


def test_transport_refuses_proxies():
    http = client.make_session(Guard())
    with pytest.raises(ValueError, match="proxies"):
        http.get("http://example.com/", proxies={"http": "http://127.0.0.1:3128"}, timeout=1)


def test_session_is_one_per_process_and_allow_list(monkeypatch):
    first = client.session(["127.0.0.1:1"])
    assert client.session(["127.0.0.1:1"]) is first
    assert client.session(["127.0.0.1:2"]) is not first
    assert first.trust_env is False
    # a session made before a fork is not used by the child
    current = client.session([])
    monkeypatch.setattr(client.os, "getpid", lambda: -1)
    assert client.session([]) is not current


def test_session_keeps_no_cookies():
    with LoopbackServer() as server:
        from tasks_app.http.testing import Reply

        server.script("/set", Reply(headers={"Set-Cookie": "sid=abc; Path=/"}))
        http = client.make_session(Guard(allowed=parse_allowed_hosts([server.netloc])))
        http.get(server.url("/set"), timeout=2)
        http.get(server.url("/next"), timeout=2)
        assert server.received("/next")[0].header("Cookie") is None
        assert len(http.cookies) == 0


def test_requests_exception_types_are_not_swallowed_by_the_transport():
    http = client.make_session(Guard(allowed=parse_allowed_hosts(["127.0.0.1"])))
    with Listener("127.0.0.1") as listener:
        port = listener.port
    with pytest.raises(requests.ConnectionError):  # nothing listens there any more
        http.get(f"http://127.0.0.1:{port}/", timeout=2)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "localhost",
        "LocalHost",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ],
)
def test_every_spelling_of_loopback_is_refused_before_a_connection(host):
    with Listener("127.0.0.1") as listener:
        http = client.make_session(Guard())
        with pytest.raises(DestinationRefused):
            http.get(f"http://{host}:{listener.port}/", timeout=2)
        assert listener.accepted() == 0


@pytest.mark.parametrize("host", ["127.0.0.1.", "localhost."])
def test_a_trailing_dot_is_resolved_as_given_and_never_connects(host):
    # the name goes to the resolver as urllib3 gives it: refused if it resolves, else an error
    with Listener("127.0.0.1") as listener:
        http = client.make_session(Guard())
        with pytest.raises((DestinationRefused, requests.ConnectionError)):
            http.get(f"http://{host}:{listener.port}/", timeout=2)
        assert listener.accepted() == 0


def test_ipv6_loopback_is_refused_before_a_connection():
    with Listener("::1") as listener:
        http = client.make_session(Guard())
        with pytest.raises(DestinationRefused, match="loopback"):
            http.get(f"http://[::1]:{listener.port}/", timeout=2)
        assert listener.accepted() == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://[fe80::1]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[64:ff9b:1::808:808]/",
        "http://[2002:a9fe:a9fe::]/",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
    ],
)
def test_addresses_that_cannot_be_bound_here_are_never_connected_to(url, monkeypatch):
    # no listener can be bound on these in a test, so witness the connect call instead
    attempts: list[object] = []
    monkeypatch.setattr(transport, "connect", lambda *args, **kwargs: attempts.append(args))
    with pytest.raises(DestinationRefused):
        client.make_session(Guard()).get(url, timeout=1)
    assert attempts == []
