"""compose.yaml against the Compose Specification's JSON Schema, and what the stack promises.

The schema is the one Docker Compose v2.40.3 validates with (tests/schemas/README.md says where
it comes from). The file is checked as written and after interpolation with ``.env.example``'s
values, as ``docker compose`` would see it.
"""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import pytest
import yaml

from tests import manual
from tests.unit._deploy import (
    COMPOSE_SECRETS,
    ROOT,
    SCHEMAS,
    VARIABLE,
    env_example,
    interpolate,
    seconds,
)

COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker-http", "worker-data", "worker-default", "beat", "flower")
WORKERS = ("worker-http", "worker-data", "worker-default")
REQUIRED = tuple(COMPOSE_SECRETS)
SECRETS = COMPOSE_SECRETS


def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


VALIDATOR = _validator()


def _errors(document) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in VALIDATOR.iter_errors(document)
    ]


# --- the specification -------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification():
    assert _errors(COMPOSE) == []


@pytest.mark.parametrize("source", ["env.example", "defaults"])
def test_interpolated_compose_file_validates(source):
    environ = {**(env_example() if source == "env.example" else {}), **SECRETS}
    resolved = interpolate(COMPOSE, environ)
    assert _errors(resolved) == []
    assert "${" not in json.dumps(resolved)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "web", "depends_on", "migrate", "condition"), "service_finished"),
        (("services", "web", "healthcheck"), {"test": ["CMD", "true"], "intervall": "5s"}),
        (("services", "web", "comand"), ["web"]),
        (("volumes", "postgres-data"), "not-a-mapping"),
    ],
    ids=["bad-condition", "misspelt-healthcheck-field", "misspelt-service-field", "bad-volume"],
)
def test_the_schema_refuses_mistakes(path, value):
    broken = copy.deepcopy(COMPOSE)
    target = broken
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    assert _errors(broken), f"schema accepted {path} = {value!r}"


@pytest.mark.parametrize("missing", REQUIRED)
def test_each_secret_is_required(missing):
    environ = {name: value for name, value in SECRETS.items() if name != missing}
    with pytest.raises(LookupError, match=rf"{missing} is missing a value: set {missing} in \.env"):
        interpolate(COMPOSE, environ)
    # empty counts as missing (copying .env.example without filling it in)
    with pytest.raises(LookupError, match=missing):
        interpolate(COMPOSE, {**environ, missing: ""})


# --- the stack ---------------------------------------------------------------------------------


def test_services():
    assert set(SERVICES) == {"postgres", "rabbitmq", *APP_SERVICES}


def test_postgres_and_rabbitmq_have_healthchecks_and_volumes():
    assert SERVICES["rabbitmq"]["image"].startswith("rabbitmq:")
    assert SERVICES["rabbitmq"]["image"].endswith("-management")
    for name, mount in (
        ("postgres", "/var/lib/postgresql/data"),
        ("rabbitmq", "/var/lib/rabbitmq"),
    ):
        service = SERVICES[name]
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
        assert {"interval", "timeout", "retries"} <= set(check)
        volume, _, path = service["volumes"][0].partition(":")
        assert path == mount
        assert volume in COMPOSE["volumes"], "a named volume, kept across `down`"
    # RabbitMQ keeps data under rabbit@<hostname>: a fixed hostname keeps the volume usable
    assert SERVICES["rabbitmq"]["hostname"] == "rabbitmq"


def test_startup_order_waits_for_healthy_services_and_the_migration():
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert SERVICES["migrate"]["restart"] == "no"
    for name in ("web", "beat", *WORKERS):
        depends = SERVICES[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert SERVICES["flower"]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def _entrypoint_processes() -> set[str]:
    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    return set(re.findall(r"^\s+([a-z-]+)\)$", text, flags=re.M))


def test_app_services_run_one_image_and_name_its_processes():
    processes = _entrypoint_processes()
    assert {"web", "worker", "beat", "flower", "migrate"} <= processes
    images = {SERVICES[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1
    expected = {
        "migrate": "migrate",
        "web": "web",
        "beat": "beat",
        "flower": "flower",
        **dict.fromkeys(WORKERS, "worker"),
    }
    for name in APP_SERVICES:
        service = SERVICES[name]
        assert service["build"]["context"] == "."
        assert service["command"][0] == expected[name], name
    assert SERVICES["beat"]["deploy"]["replicas"] == 1


def test_workers_stop_after_their_longest_task():
    for environ in ({**SECRETS}, {**env_example(), **SECRETS}):
        for name in WORKERS:
            service = interpolate(SERVICES[name], environ)
            limit = int(service["environment"]["QW_MAX_TIMEOUT_S"]) + int(
                service["environment"]["QW_LEASE_SECONDS"]
            )
            assert service.get("stop_signal", "SIGTERM") == "SIGTERM"  # Celery's warm shutdown
            assert seconds(service["stop_grace_period"]) > limit, name


def test_containers_log_json():
    for name in APP_SERVICES:
        assert SERVICES[name]["environment"]["LOG_FORMAT"] == "json", name


def test_secret_key_is_required_not_defaulted():
    for name in APP_SERVICES:
        value = SERVICES[name]["environment"]["DJANGO_SECRET_KEY"]
        assert value.startswith("${DJANGO_SECRET_KEY:?"), name


def _documented_variables() -> set[str]:
    """The variables of the configuration reference, docs/configuration.md."""
    return manual.configuration_variables()


def test_app_environment_uses_only_documented_variables():
    documented = _documented_variables()
    assert {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SECRET_KEY"} <= documented
    for name in APP_SERVICES:
        names = set(SERVICES[name]["environment"])
        flower_own = {n for n in names if n.startswith("FLOWER_")} if name == "flower" else set()
        assert names - flower_own <= documented, (name, names - flower_own - documented)


def test_env_example_names_every_variable_and_holds_no_secret():
    example = env_example()
    used = {match[0] for match in VARIABLE.findall(COMPOSE_TEXT)}
    assert used == set(example), used ^ set(example)
    for name in REQUIRED:
        assert example[name] == "", f"{name} must be empty in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_operator_ports_are_published_on_localhost_only():
    resolved = interpolate(COMPOSE, {**SECRETS})
    for name in ("web", "flower", "rabbitmq"):
        for port in resolved["services"][name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("postgres", *WORKERS, "beat", "migrate"):
        assert "ports" not in resolved["services"][name], name


def test_the_http_worker_runs_a_prefork_child_per_core():
    # HTTP_REQUEST waits on the network: each prefork child runs a message's requests together
    # in its own thread pool (QW_HTTP_CONCURRENCY), and the children use both cores
    command = SERVICES["worker-http"]["command"]
    assert command[command.index("-P") + 1] == "prefork"
    assert int(command[command.index("-c") + 1]) == 2
    for name in ("worker-data", "worker-default"):
        assert "-P" not in SERVICES[name]["command"], name  # CPU-bound: prefork
