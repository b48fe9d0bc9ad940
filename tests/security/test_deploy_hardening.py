"""Production hardening: Django's deployment checks pass on the production environments, the
defaults keep ``make run`` on plain HTTP, Flower runs only behind a login, and the Kubernetes
NetworkPolicies isolate the pods (workers, which fetch what tenants name, reach no private or
metadata address)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rest_framework.test import APIClient

from tests import manual
from tests.unit._deploy import (
    COMPOSE_SECRETS,
    OVERLAYS,
    ROOT,
    WORKLOAD_KINDS,
    by_kind,
    egress_allows,
    env_example,
    interpolate,
    policies_for,
    port_allowed,
    rendered,
    shell_words,
)

SECRET_STAND_INS = {
    "DATABASE_URL": "postgres://queueworker:pw@postgres:5432/queueworker",
    "CELERY_BROKER_URL": "amqp://queueworker:pw@rabbitmq:5672/queueworker",
}
HTTPS_ENV = {
    "DJANGO_TRUST_X_FORWARDED_PROTO": "true",
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
    "DJANGO_SECURE_COOKIES": "true",
}
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def _check_deploy(environ: dict[str, str], var_dir: Path) -> subprocess.CompletedProcess[str]:
    """``manage.py check --deploy --fail-level WARNING`` in a process given only ``environ``."""
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={
            "PATH": os.environ["PATH"],
            "DJANGO_SETTINGS_MODULE": "queueworker.settings",
            "QW_VAR_DIR": str(var_dir),
            **environ,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def _prod_overlay_environment() -> dict[str, str]:
    (config_map,) = by_kind(list(rendered("prod")), "ConfigMap").values()
    return {
        **config_map["data"],
        **SECRET_STAND_INS,
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    }


def _compose_environment(dotenv: dict[str, str]) -> dict[str, str]:
    web = interpolate(COMPOSE["web"], {**env_example(), **COMPOSE_SECRETS, **dotenv})
    return {name: str(value) for name, value in web["environment"].items()}


# --- check --deploy ----------------------------------------------------------------------------


def test_check_deploy_passes_on_the_prod_overlay(tmp_path):
    done = _check_deploy(_prod_overlay_environment(), tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_check_deploy_passes_on_compose_behind_a_tls_proxy(tmp_path):
    # .env with the HTTPS settings README "docker compose" asks for behind a proxy
    dotenv = {
        **HTTPS_ENV,
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "queueworker.example.com,localhost",
    }

    done = _check_deploy(_compose_environment(dotenv), tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr


def test_check_deploy_fails_on_the_development_defaults(tmp_path):
    # the control: the same check, on `make run`'s defaults, names every HTTPS setting (not
    # the key: the embedded demo makes a private one in QW_VAR_DIR)
    done = _check_deploy({}, tmp_path)

    assert done.returncode != 0
    for check in ("W004", "W008", "W012", "W016"):  # HSTS, redirect, cookies
        assert f"security.{check}" in done.stderr, check


# --- HTTPS at run time -------------------------------------------------------------------------


@pytest.mark.django_db
def test_defaults_serve_plain_http(api, settings):
    assert settings.SECURE_SSL_REDIRECT is False
    assert settings.SESSION_COOKIE_SECURE is False and settings.CSRF_COOKIE_SECURE is False

    response = api.get("/api/tasks/")

    assert response.status_code == 200
    assert "Strict-Transport-Security" not in response


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "redirected"),
    [
        ("/api/tasks/", True),
        ("/admin/", True),
        ("/api/health/live/", False),
        ("/metrics", False),
    ],
)
def test_ssl_redirect_spares_probes_and_scrapes(settings, path, redirected):
    settings.SECURE_SSL_REDIRECT = True

    response = APIClient().get(path)

    if redirected:
        assert response.status_code == 301
        assert response["Location"] == f"https://testserver{path}"
    else:
        assert response.status_code == 200


@pytest.mark.django_db
def test_hsts_header_is_sent_over_https(settings):
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True

    response = APIClient().get("/api/health/live/", secure=True)

    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


# --- Flower: never without a login ------------------------------------------------------------


def _procfile_command(name: str) -> list[str]:
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process == name:
            return shell_words(command)
    raise AssertionError(f"no {name} in the Procfile")


def test_procfile_flower_listens_on_localhost_with_no_password_on_its_command_line():
    words = _procfile_command("flower")

    assert words[:4] == ["celery", "-A", "queueworker", "flower"]
    assert "--address=127.0.0.1" in words
    assert not any(w.startswith(("--basic-auth", "--basic_auth", "--auth")) for w in words)


def test_make_run_always_gives_flower_a_login():
    # the run target makes a password when none is set, and hands it to honcho's processes
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]

    generate = re.search(
        r'if \[ -z "\$\$FLOWER_BASIC_AUTH" \] && \[ ! -s "\$\(FLOWER_AUTH_FILE\)" \].*?umask 077'
        r'.*?"admin:" \+ secrets\.token_urlsafe\(\d+\).*?> "\$\(FLOWER_AUTH_FILE\)"',
        recipe,
        flags=re.S,
    )
    start = re.search(
        r'FLOWER_BASIC_AUTH="\$\$\{FLOWER_BASIC_AUTH:-\$\$\(cat "\$\(FLOWER_AUTH_FILE\)"\)\}"'
        r"[^\n]*\\\n[^\n]*honcho start -f Procfile",
        recipe,
    )
    assert generate, recipe
    assert start, recipe
    assert recipe.index(generate.group(0)) < recipe.index(start.group(0))


def test_compose_refuses_to_start_flower_without_a_login():
    flower = COMPOSE["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])

    secrets_but_flowers = {k: v for k, v in COMPOSE_SECRETS.items() if k != "FLOWER_BASIC_AUTH"}
    with pytest.raises(LookupError, match="FLOWER_BASIC_AUTH"):
        interpolate(flower, {**env_example(), **secrets_but_flowers, "FLOWER_BASIC_AUTH": ""})


# --- Kubernetes: network isolation ------------------------------------------------------------

WORKERS = ("queueworker-worker-http", "queueworker-worker-data", "queueworker-worker-default")
PRIVATE_RANGES = [
    ipaddress.ip_network(cidr)
    for cidr in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "127.0.0.0/8",
        "fc00::/7",
        "fe80::/10",
    )
]
METADATA = ipaddress.ip_address("169.254.169.254")
# What a worker may reach at any address: DNS, PostgreSQL, RabbitMQ (AMQP, AMQPS).
SERVICE_PORTS = [(53, "UDP"), (53, "TCP"), (5432, "TCP"), (5672, "TCP"), (5671, "TCP")]
PUBLIC = ("52.216.8.19", "2606:4700:4700::1111")  # an S3 endpoint's, a public resolver's


def _pods(overlay: str) -> dict[str, dict]:
    """Workload name → (its pod labels, its containers' named ports)."""
    pods = {}
    for resource in rendered(overlay):
        if resource["kind"] in WORKLOAD_KINDS:
            template = resource["spec"]["template"]
            ports = {
                port["name"]: port["containerPort"]
                for container in template["spec"]["containers"]
                for port in container.get("ports", [])
                if "name" in port
            }
            pods[resource["metadata"]["name"]] = {
                "labels": template["metadata"]["labels"],
                "ports": ports,
            }
    return pods


def _ingress_rules(overlay: str, labels: dict[str, str]) -> list[dict]:
    policies = policies_for(rendered(overlay), labels, "Ingress")
    assert policies, f"no ingress policy selects {labels}: all traffic is let in"
    return [rule for policy in policies for rule in policy["spec"].get("ingress", [])]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_denies_ingress_by_default(overlay):
    resources = rendered(overlay)
    deny = [
        policy
        for policy in by_kind(list(resources), "NetworkPolicy").values()
        if policy["spec"]["podSelector"] == {}
        and policy["spec"].get("policyTypes") == ["Ingress"]
        and not policy["spec"].get("ingress")
    ]
    assert len(deny) == 1, "no default-deny ingress policy for the namespace"
    assert deny[0]["metadata"]["namespace"] == f"queueworker-{overlay}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_web_and_flower_accept_connections(overlay):
    pods = _pods(overlay)
    assert {"queueworker-web", "queueworker-flower", "queueworker-beat", *WORKERS} <= set(pods)
    for name, pod in pods.items():
        rules = _ingress_rules(overlay, pod["labels"])
        if name == "queueworker-web":
            # from anywhere (the ingress controller, clients, Prometheus), on gunicorn's port only
            assert any(not rule.get("from") for rule in rules)
            for rule in rules:
                assert rule.get("ports"), "a rule opens every port of web"
                assert port_allowed(rule["ports"], 8000, "TCP", pod["ports"])
                assert not port_allowed(rule["ports"], 5555, "TCP", pod["ports"])
        elif name != "queueworker-flower":
            assert rules == [], f"{name} serves nothing, yet accepts connections"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_flower_is_reachable_only_from_operators_namespaces(overlay):
    pod = _pods(overlay)["queueworker-flower"]
    rules = _ingress_rules(overlay, pod["labels"])
    assert rules, "Flower would be unreachable even for operators"
    readme = manual.text()  # README.md and docs/ (docs/deployment.md)
    for rule in rules:
        peers = rule.get("from")
        assert peers, "a Flower rule without `from` lets every pod and address in"
        for peer in peers:
            assert set(peer) <= {"namespaceSelector", "podSelector"}, peer  # no ipBlock
            selector = peer.get("namespaceSelector")
            # an empty (or missing) namespace selector means every namespace (or this one)
            assert selector and (selector.get("matchLabels") or selector.get("matchExpressions"))
            for label, value in selector.get("matchLabels", {}).items():
                assert f"{label}={value}" in readme, "the manual says which label to set"
        assert rule.get("ports") and port_allowed(rule["ports"], 5555, "TCP", pod["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_egress_except_list_covers_private_ranges_and_metadata(overlay):
    pods = _pods(overlay)
    for name in WORKERS:
        policies = policies_for(rendered(overlay), pods[name]["labels"], "Egress")
        assert policies, f"{name} has no egress policy: it may reach anything"
        blocks = [
            peer["ipBlock"]
            for policy in policies
            for rule in policy["spec"].get("egress", [])
            for peer in rule.get("to", [])
            if "ipBlock" in peer
        ]
        assert {ipaddress.ip_network(b["cidr"]).version for b in blocks} == {4, 6}, blocks
        for block in blocks:
            cidr = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(c) for c in block.get("except", [])]
            for private in PRIVATE_RANGES:
                if private.version == cidr.version and private.overlaps(cidr):
                    assert any(private.subnet_of(e) for e in excepted), (name, block, private)
            if METADATA in cidr:
                assert any(METADATA in e for e in excepted), (name, block)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_egress_reaches_services_and_the_internet_but_no_private_address(overlay):
    resources = rendered(overlay)
    pods = _pods(overlay)
    for name in WORKERS:
        labels = pods[name]["labels"]
        # the metadata service and every private range, on the ports an SSRF would use
        for address in [METADATA, *(network[1] for network in PRIVATE_RANGES)]:
            for port in (80, 443, 8080, 6443):
                assert not egress_allows(resources, labels, str(address), port), (
                    name,
                    str(address),
                    port,
                )
        # DNS, PostgreSQL and RabbitMQ wherever they run; public hosts on any port
        for port, protocol in SERVICE_PORTS:
            assert egress_allows(resources, labels, "10.96.0.10", port, protocol), (name, port)
        for address in PUBLIC:
            for port in (443, 80, 8443):
                assert egress_allows(resources, labels, address, port), (name, address, port)
