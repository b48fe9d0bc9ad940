"""Production hardening: Django's deployment checks pass on the production environments, the
defaults keep ``make run`` on plain HTTP, and Flower runs only behind a login."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rest_framework.test import APIClient

from tests.unit._deploy import (
    COMPOSE_SECRETS,
    ROOT,
    by_kind,
    env_example,
    interpolate,
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
    # the control: the same check, on `make run`'s defaults, names every HTTPS setting
    done = _check_deploy({}, tmp_path)

    assert done.returncode != 0
    for check in ("W004", "W008", "W009", "W012", "W016"):  # HSTS, redirect, key, cookies
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
