"""settings.py accepts the environment each deployment gives the processes, and reads it right.

The environments: compose.yaml's (with its defaults, and with .env.example's values) and each
overlay's ConfigMap, with stand-in values for what the Secret holds. Settings refuse a bad or
inconsistent value at import (ImproperlyConfigured), so loading them is the check; one
subprocess loads all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.unit._deploy import (
    COMPOSE_SECRETS,
    OVERLAYS,
    ROOT,
    by_kind,
    env_example,
    interpolate,
    rendered,
    seconds,
)

SECRET_STAND_INS = {
    "DJANGO_SECRET_KEY": "stand-in-secret-key-for-settings-test",
    "DATABASE_URL": "postgres://queueworker:pw@postgres:5432/queueworker",
    "CELERY_BROKER_URL": "amqp://queueworker:pw@rabbitmq:5672/queueworker",
}
LOADER = """
import json, os, runpy, sys
results = {}
for name, environ in json.load(sys.stdin).items():
    for var in [v for v in os.environ if v.startswith(("QW_", "DJANGO_", "LOG_", "CELERY_"))]:
        del os.environ[var]
    os.environ.update(environ)
    try:
        s = runpy.run_module("queueworker.settings")
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    results[name] = {
        k: s.get(k)
        for k in ("SECURE_PROXY_SSL_HEADER", "CELERY_TASK_TIME_LIMIT", "QW_MAX_TIMEOUT_S",
                  "QW_LEASE_SECONDS", "LOG_FORMAT", "DEBUG", "ALLOWED_HOSTS", "IS_POSTGRES",
                  "IS_EMBEDDED_BROKER")
    }
print(json.dumps(results))
"""


def _environments(var_dir: Path) -> dict[str, tuple[dict[str, str], float]]:
    """name → (the process environment, the worker's grace period in seconds)."""
    image = {"QW_VAR_DIR": str(var_dir), "LOG_FORMAT": "json"}  # the Dockerfile's ENV
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    environments = {}
    for source, values in (("compose-defaults", {}), ("compose-env-example", env_example())):
        worker = interpolate(compose["worker-http"], {**values, **COMPOSE_SECRETS})
        environ = {k: str(v) for k, v in worker["environment"].items()}
        environments[source] = ({**image, **environ}, seconds(worker["stop_grace_period"]))
    for overlay in OVERLAYS:
        resources = rendered(overlay)
        (config_map,) = by_kind(resources, "ConfigMap").values()
        worker = by_kind(resources, "Deployment")["queueworker-worker-http"]
        grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        environments[overlay] = ({**image, **config_map["data"], **SECRET_STAND_INS}, grace)
    return environments


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    environments = _environments(tmp_path_factory.mktemp("var"))
    done = subprocess.run(
        [sys.executable, "-c", LOADER],
        input=json.dumps({name: environ for name, (environ, _) in environments.items()}),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "queueworker.settings"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: (results[name], grace) for name, (_, grace) in environments.items()}


ENVIRONMENTS = ("compose-defaults", "compose-env-example", *OVERLAYS)


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_settings_accept_the_deployment_environment(loaded, name):
    result, _ = loaded[name]
    assert "error" not in result, result.get("error")
    assert result["IS_POSTGRES"] is True and result["IS_EMBEDDED_BROKER"] is False
    assert result["LOG_FORMAT"] == "json"
    assert result["DEBUG"] is False
    assert "localhost" in result["ALLOWED_HOSTS"]  # the health checks' Host


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_workers_are_given_longer_than_the_hard_time_limit_to_stop(loaded, name):
    result, grace = loaded[name]
    assert (
        result["CELERY_TASK_TIME_LIMIT"] == result["QW_MAX_TIMEOUT_S"] + result["QW_LEASE_SECONDS"]
    )
    assert grace > result["CELERY_TASK_TIME_LIMIT"], (name, grace)


def test_only_prod_trusts_the_proxy_forwarded_proto(loaded):
    assert loaded["prod"][0]["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    for name in ("compose-defaults", "compose-env-example", "dev"):
        assert loaded[name][0]["SECURE_PROXY_SSL_HEADER"] is None, name
