"""Secret bindings: ``QW_SECRET_<NAME>_HOSTS`` lists where ``{"$secret": NAME}`` may be sent."""

from __future__ import annotations

import pytest

from queueworker.config import Env
from tasks_app.http import secrets
from tasks_app.http.guard import parse_target

TOKEN = {"$secret": "ORDERS_TOKEN"}


def _env(**variables: str) -> Env:
    return Env({f"QW_SECRET_{name}": value for name, value in variables.items()})


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        ("api.example.org", "https://api.example.org/v1"),
        ("api.example.org", "http://api.example.org:8080/"),  # no port: any port
        ("API.Example.ORG.", "https://api.EXAMPLE.org/"),  # any case, a trailing dot
        ("api.example.org:443", "https://api.example.org/"),  # the default port counts
        ("api.example.org:80", "http://api.example.org/"),
        ("api.example.org:8443", "https://api.example.org:8443/"),
        ("other.test, api.example.org:443", "https://api.example.org:443/"),
        ("bücher.example", "https://xn--bcher-kva.example/"),  # IDNA, either way round
        ("xn--bcher-kva.example", "https://Bücher.example/"),
        ("[2001:db8::1]:443", "https://[2001:db8:0::1]/"),
    ],
)
def test_a_secret_is_bound_to_the_hosts_its_list_names(hosts, url):
    env = _env(ORDERS_TOKEN_HOSTS=hosts)
    assert secrets.binding("ORDERS_TOKEN", env).refusal(parse_target(url)) is None
    assert secrets.binding_problems({"url": url, "headers": {"X-Api-Key": TOKEN}}, env) == []


@pytest.mark.parametrize(
    ("hosts", "url", "shown"),
    [
        ("api.example.org", "https://evil.example/", "evil.example"),
        (
            "api.example.org",
            "https://api.example.org.evil.example/",
            "api.example.org.evil.example",
        ),
        ("api.example.org:443", "http://api.example.org/", "api.example.org"),  # port 80
        ("api.example.org:443", "https://api.example.org:8443/", "api.example.org:8443"),
        ("example.org", "https://api.example.org/", "api.example.org"),  # no subdomains
    ],
)
def test_a_secret_is_refused_for_any_other_destination(hosts, url, shown):
    env = _env(ORDERS_TOKEN_HOSTS=hosts)
    reason = secrets.binding("ORDERS_TOKEN", env).refusal(parse_target(url))
    assert reason == f"secret ORDERS_TOKEN is not bound to {shown}"


def test_a_secret_without_a_list_is_bound_to_nothing():
    env = _env(ORDERS_TOKEN="the-value")
    binding = secrets.binding("ORDERS_TOKEN", env)
    assert binding.refusal(parse_target("https://api.example.org/")) == (
        "secret ORDERS_TOKEN is not bound to api.example.org "
        "(QW_SECRET_ORDERS_TOKEN_HOSTS is not set)"
    )
    assert binding.refusal(None) is not None  # not even to a URL that is itself a secret
    assert secrets.binding("ORDERS_TOKEN", _env(ORDERS_TOKEN_HOSTS=" ")).hosts == ()


def test_a_malformed_or_unreadable_list_refuses_without_showing_it(tmp_path):
    bad = secrets.binding("ORDERS_TOKEN", _env(ORDERS_TOKEN_HOSTS="api.example.org:http"))
    gone = secrets.binding("ORDERS_TOKEN", _env(ORDERS_TOKEN_HOSTS_FILE=str(tmp_path / "missing")))
    target = parse_target("https://api.example.org/")
    assert bad.refusal(target) == (
        "secret ORDERS_TOKEN is not bound to api.example.org "
        "(QW_SECRET_ORDERS_TOKEN_HOSTS is not a list of host or host:port)"
    )
    assert "_HOSTS_FILE cannot be read" in (gone.refusal(target) or "")


def test_a_list_may_come_from_a_file(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("api.example.org\n")
    env = _env(ORDERS_TOKEN_HOSTS_FILE=str(hosts))
    assert (
        secrets.binding("ORDERS_TOKEN", env).refusal(parse_target("https://api.example.org"))
        is None
    )
    assert secrets.binding("ORDERS_TOKEN", env).refusal(parse_target("https://x.test")) is not None


def test_binding_problems_name_every_field_that_holds_an_unbound_secret():
    # given a payload with secrets in every place a string may be, one bound elsewhere
    env = _env(ORDERS_TOKEN_HOSTS="api.example.org", OTHER_HOSTS="elsewhere.test")
    payload = {
        "url": "https://api.example.org/v1",
        "headers": {"X-Api-Key": TOKEN, "X-Other": {"$secret": "OTHER"}},
        "params": {"k": {"$secret": "OTHER"}, "many": ["a", {"$secret": "UNSET"}]},
        "json": {"deep": [{"k": {"$secret": "OTHER"}}]},
        "auth": {"type": "bearer", "token": {"$secret": "UNSET"}},
    }

    # when the create-time check runs
    problems = secrets.binding_problems(payload, env)

    # then each field at fault is named, the bound one is not
    not_bound = "secret OTHER is not bound to api.example.org"
    unset = "secret UNSET is not bound to api.example.org (QW_SECRET_UNSET_HOSTS is not set)"
    assert problems == [
        ("headers.X-Other", not_bound),
        ("params.k", not_bound),
        ("params.many[1]", unset),
        ("json.deep[0].k", not_bound),
        ("auth.token", unset),
    ]


def test_a_url_that_is_a_secret_needs_lists_only_at_create():
    # its host is known only to the worker, which checks it when it reads the URL
    payload = {"url": {"$secret": "ENDPOINT"}, "headers": {"X-Api-Key": TOKEN}}
    bound = _env(ENDPOINT_HOSTS="api.example.org", ORDERS_TOKEN_HOSTS="api.example.org")
    assert secrets.binding_problems(payload, bound) == []
    assert secrets.binding_problems(payload, _env(ENDPOINT_HOSTS="api.example.org")) == [
        (
            "headers.X-Api-Key",
            "secret ORDERS_TOKEN is not bound to any host "
            "(QW_SECRET_ORDERS_TOKEN_HOSTS is not set)",
        )
    ]


def test_an_invalid_url_leaves_its_secrets_to_the_url_error():
    assert secrets.binding_problems({"url": "ftp://x", "headers": {"K": TOKEN}}, _env()) == []


def test_bindings_reads_each_name_once_and_refusal_gives_the_first_reason():
    env = _env(ORDERS_TOKEN_HOSTS="api.example.org")
    bound = secrets.bindings({"url": "u", "headers": {"A": TOKEN, "B": TOKEN}, "body": TOKEN}, env)
    assert [b.name for b in bound] == ["ORDERS_TOKEN"]
    assert secrets.refusal(bound, parse_target("https://api.example.org/")) is None
    assert secrets.refusal(bound, parse_target("https://x.test/"), "the URL's host") == (
        "secret ORDERS_TOKEN is not bound to the URL's host"
    )
