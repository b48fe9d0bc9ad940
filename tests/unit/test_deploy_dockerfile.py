"""The Dockerfile, its entrypoint and its health check, read and run without a Docker engine.

Checked: the stages (wheels built in one, installed without an index in a slim runtime that has
no build tools), the non-root numeric USER, the HEALTHCHECK, no secret in the image or its build
context, static files collected at build time; the entrypoint's dispatch run with stand-in
programs; the health check's choice of process and its HTTP check against a local server and
against the real app's ALLOWED_HOSTS.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from tests.unit._deploy import (
    OVERLAYS,
    ROOT,
    by_kind,
    dockerfile_instructions,
    dockerfile_stages,
    rendered,
    shell_words,
)

DOCKERFILE = (ROOT / "Dockerfile").read_text()
STAGES = dict(dockerfile_stages(DOCKERFILE))
RUNTIME = dockerfile_stages(DOCKERFILE)[-1][1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cmake", "libpq-dev", "python3-dev")


def _instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec form: {arguments}"
    return value


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in _instructions(stage, "ENV"):
        for word in shell_words(arguments):
            name, sep, value = word.partition("=")
            assert sep, f"ENV without '=': {arguments}"
            env[name] = value
    return env


# --- stages ------------------------------------------------------------------------------------


def test_two_stages_wheels_built_then_installed_without_an_index():
    # given the stages in order
    names = [name for name, _ in dockerfile_stages(DOCKERFILE)]
    assert names == ["build", "runtime"]
    # the build stage makes wheels of the project and its dependencies
    assert any(
        "pip wheel" in run and "/wheels" in run for run in _instructions(STAGES["build"], "RUN")
    )
    # the runtime installs those wheels only (no index: nothing else can come in)
    installs = [run for run in _instructions(RUNTIME, "RUN") if "pip install" in run]
    assert len(installs) == 1
    assert "--no-index" in installs[0]
    assert "from=build" in installs[0] and "/wheels" in installs[0]


def test_runtime_is_python_3_11_slim():
    args = {}
    for instruction, arguments in dockerfile_instructions(DOCKERFILE):
        if instruction == "ARG" and "=" in arguments:
            name, value = arguments.split("=", 1)
            args[name] = value
    froms = [a for i, a in dockerfile_instructions(DOCKERFILE) if i == "FROM"]
    for stage in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.split()[0])
        # a full release (or a digest), never a tag that moves under a rebuild
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image


def test_image_installs_the_locked_versions():
    # given the build stage's wheels, made from uv.lock
    (wheel,) = [run for run in _instructions(STAGES["build"], "RUN") if "pip wheel" in run]
    assert "uv export --frozen --no-dev" in wheel  # the lock as it is, without the tool groups
    assert "--require-hashes" in wheel
    assert any("uv.lock" in copy for copy in _instructions(STAGES["build"], "COPY"))
    # then the runtime installs under the lock's pins, without an index
    (install,) = [run for run in _instructions(RUNTIME, "RUN") if "pip install" in run]
    assert "--constraint" in install and "/wheels/constraints.txt" in install
    # and the uv that exports is pinned too
    args = dict(
        arguments.split("=", 1)
        for instruction, arguments in dockerfile_instructions(DOCKERFILE)
        if instruction == "ARG" and "=" in arguments
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["UV_VERSION"])


def test_image_installs_the_s3_extra_that_the_overlays_storage_needs():
    # given the storage backends the overlays configure, and the project's extras
    backends = {
        config_map["data"].get("QW_ARTIFACT_STORAGE", "")
        for overlay in OVERLAYS
        for config_map in by_kind(list(rendered(overlay)), "ConfigMap").values()
    }
    assert "storages.backends.s3.S3Storage" in backends
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (storages,) = [Requirement(r) for r in extras["s3"] if Requirement(r).name == "django-storages"]
    assert "s3" in storages.extras  # boto3
    # then the wheels include the extra, and the runtime installs it
    (wheel,) = [run for run in _instructions(STAGES["build"], "RUN") if "pip wheel" in run]
    assert ".[s3]" in shell_words(wheel) and "--extra s3" in wheel
    (install,) = [run for run in _instructions(RUNTIME, "RUN") if "pip install" in run]
    assert "queueworker[s3]" in shell_words(install)


def test_runtime_stage_has_no_build_tools():
    for run in _instructions(RUNTIME, "RUN"):
        assert "pip wheel" not in run
        assert "setup.py" not in run
        if "apt-get install" in run or "apk add" in run:
            words = set(run.split())
            assert not words & set(BUILD_TOOLS), run
    # and no COPY of the build stage's wheels into a layer
    assert not any("--from=build" in copy for copy in _instructions(RUNTIME, "COPY"))


def test_runs_as_numeric_non_root_user_created_in_the_image():
    users = _instructions(RUNTIME, "USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be numeric (runAsNonRoot checks it)"
    assert gid.isdigit() and int(gid) > 0
    assert any(f"--uid {uid}" in run for run in _instructions(RUNTIME, "RUN"))
    # USER comes after the last RUN: nothing runs as root at start
    order = [instruction for instruction, _ in RUNTIME]
    assert order.index("USER") > max(i for i, name in enumerate(order) if name == "RUN")


def test_healthcheck_runs_the_process_aware_script():
    checks = _instructions(RUNTIME, "HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options
    argv = _exec_form(command.strip())
    assert argv == ["python", "/app/docker/healthcheck.py"]
    assert any("docker/healthcheck.py" in copy for copy in _instructions(RUNTIME, "COPY"))


def test_entrypoint_and_default_command():
    assert _exec_form(_instructions(RUNTIME, "ENTRYPOINT")[-1]) == ["/app/docker/entrypoint.sh"]
    assert _exec_form(_instructions(RUNTIME, "CMD")[-1]) == ["web"]
    assert any("entrypoint.sh" in c and "--chmod=0755" in c for c in _instructions(RUNTIME, "COPY"))


def test_static_files_collected_at_build_time_with_json_logs():
    env = _env(RUNTIME)
    assert env["QW_VAR_DIR"] == "/app/var"
    assert env["LOG_FORMAT"] == "json"
    collect = [run for run in _instructions(RUNTIME, "RUN") if "collectstatic" in run]
    assert len(collect) == 1 and "--no-input" in collect[0]
    # the app user may write QW_VAR_DIR (and nothing else of /app)
    assert "chown -R 10001:10001 /app/var" in collect[0]


# --- no secrets --------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|PRIVATE", re.I)


def test_no_secret_in_the_image():
    for instruction, arguments in dockerfile_instructions(DOCKERFILE):
        if instruction in ("ENV", "ARG", "LABEL"):
            assert not SECRET_NAME.search(arguments), f"{instruction} {arguments}"
        # no credentials in a URL (scheme://user:password@host)
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", arguments), arguments
        if instruction in ("COPY", "ADD"):
            assert ".env" not in arguments.split() and " . " not in f" {arguments} "
    # the one secret-like value is the placeholder scoped to the collectstatic step
    keys = re.findall(r"DJANGO_SECRET_KEY=(\S+)", DOCKERFILE)
    assert keys == ["collectstatic-placeholder-not-a-secret"]


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".env", ".env.*", ".git", ".venv", "var", "*.pem", "*.key"):
        assert needed in patterns, needed
    assert not any(p.startswith("!") for p in patterns), "nothing is re-included"
    # and what the image copies is not ignored
    copied = {
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "manage.py",
        "queueworker",
        "tasks_app",
        "docker",
    }
    assert not copied & patterns


# --- the entrypoint, run with stand-in programs -------------------------------------------------


@pytest.fixture
def stub_path(tmp_path: Path) -> Path:
    """gunicorn, celery and python that print their argv instead of running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("gunicorn", "celery", "python", "sleep"):
        script = bin_dir / program
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{program} $*" >> "$STUB_LOG"\n'
            'echo "$$" > "$STUB_PID"\n'
            # python manage.py migrate --check fails while $STUB_FAILS counts down
            'if [ "$*" = "manage.py migrate --check" ] && [ "$(cat "$STUB_FAILS")" -gt 0 ]; then\n'
            '  echo $(( $(cat "$STUB_FAILS") - 1 )) > "$STUB_FAILS"; exit 1\n'
            "fi\n"
        )
        script.chmod(0o755)
    return bin_dir


def _run_entrypoint(
    stub_path: Path, *args: str, fails: int = 0, env: dict[str, str] | None = None
) -> tuple[int, list[str], bool]:
    """Exit status, the stand-ins' calls, and whether the last one replaced the shell (exec).

    Flower's login is set unless ``env`` says otherwise."""
    log = stub_path.parent / "calls.log"
    counter = stub_path.parent / "fails"
    pid_file = stub_path.parent / "pid"
    counter.write_text(str(fails))
    log.write_text("")
    env = {
        "PATH": f"{stub_path}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "STUB_FAILS": str(counter),
        "STUB_PID": str(pid_file),
        "QW_MIGRATION_WAIT_S": "0",
        "LOG_LEVEL": "info",
        "FLOWER_BASIC_AUTH": "admin:secret",
        **(env or {}),
    }
    process = subprocess.Popen(
        ["sh", str(ENTRYPOINT), *args],
        env={k: v for k, v in env.items() if v},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.communicate(timeout=20)
    exec_ed = pid_file.exists() and pid_file.read_text().strip() == str(process.pid)
    return process.returncode, log.read_text().splitlines(), exec_ed


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "gunicorn queueworker.wsgi --config /app/docker/gunicorn.conf.py"),
        (("web",), "gunicorn queueworker.wsgi --config /app/docker/gunicorn.conf.py"),
        (
            ("worker", "-Q", "http.request"),
            "celery -A queueworker worker --loglevel info -Q http.request",
        ),
        (
            ("beat",),
            "celery -A queueworker beat --loglevel info --schedule /tmp/celerybeat-schedule",
        ),
        (("flower",), "celery -A queueworker flower --port=5555 --address=0.0.0.0"),
        (("manage", "createsuperuser"), "python manage.py createsuperuser"),
        (("celery", "-A", "queueworker", "inspect", "ping"), "celery -A queueworker inspect ping"),
    ],
)
def test_entrypoint_execs_the_named_process(stub_path, args, expected):
    returncode, calls, exec_ed = _run_entrypoint(stub_path, *args)
    assert returncode == 0
    assert calls == [expected]
    # exec: the process is the container's PID 1 and gets SIGTERM itself (warm shutdown)
    assert exec_ed


def test_entrypoint_migrate_creates_the_cache_table_then_execs_migrate(stub_path):
    # the throttles' shared cache table exists once `migrate --check` passes
    returncode, calls, exec_ed = _run_entrypoint(stub_path, "migrate")
    assert returncode == 0
    assert calls == ["python manage.py createcachetable", "python manage.py migrate --no-input"]
    assert exec_ed


def test_entrypoint_processes_match_the_procfile(stub_path):
    # every Procfile process runs the same program and subcommand in the image
    procfile = (ROOT / "Procfile").read_text().splitlines()
    assert {line.partition(":")[0] for line in procfile} == {"web", "worker", "beat", "flower"}
    for line in procfile:
        name, _, command = line.partition(":")
        words = shell_words(command)
        prefix = 2 if words[0] == "gunicorn" else 4  # gunicorn queueworker.wsgi / celery -A x sub
        _, calls, _ = _run_entrypoint(stub_path, name)
        assert calls[0].split()[:prefix] == words[:prefix], (name, calls)


def test_flower_refuses_to_start_without_a_login(stub_path):
    # without FLOWER_BASIC_AUTH, Flower would serve every task's payload to anyone
    returncode, calls, _ = _run_entrypoint(stub_path, "flower", env={"FLOWER_BASIC_AUTH": ""})
    assert returncode == 64 and calls == []
    # a login on the command line is a login too
    returncode, calls, exec_ed = _run_entrypoint(
        stub_path, "flower", "--basic-auth=ops:pw", env={"FLOWER_BASIC_AUTH": ""}
    )
    assert returncode == 0 and exec_ed and "--basic-auth=ops:pw" in calls[0]


def test_wait_for_migrations_polls_migrate_check_until_it_passes(stub_path):
    returncode, calls, _ = _run_entrypoint(stub_path, "wait-for-migrations", fails=2)
    assert returncode == 0
    checks = [c for c in calls if c == "python manage.py migrate --check"]
    assert len(checks) == 3  # two failures, then success
    assert not any("migrate --no-input" in c for c in calls), "it never migrates itself"


# --- the health check --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qw_healthcheck", ROOT / "docker/healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "process"),
    [
        (["/usr/local/bin/python", "/usr/local/bin/gunicorn", "queueworker.wsgi"], "web"),
        (
            ["/usr/local/bin/python", "/usr/local/bin/celery", "-A", "queueworker", "worker"],
            "worker",
        ),
        (["celery", "-A", "queueworker", "worker", "-Q", "http.request"], "worker"),
        (["celery", "-A", "queueworker", "beat", "--schedule", "/tmp/x"], "beat"),
        (["celery", "-A", "queueworker", "flower", "--port=5555"], "flower"),
        (["python", "manage.py", "migrate", "--no-input"], "other"),
        (["/bin/sh", "/app/docker/entrypoint.sh", "wait-for-migrations"], "other"),
    ],
)
def test_healthcheck_tells_the_process_from_its_command_line(healthcheck, argv, process):
    assert healthcheck.process_of(argv) == process


@pytest.mark.parametrize(
    ("allowed", "host"),
    [
        (None, "localhost"),
        ("*", "localhost"),
        ("api.example.com,localhost", "api.example.com"),
        (".example.com", "example.com"),
    ],
)
def test_healthcheck_host_header_is_an_allowed_host(healthcheck, allowed, host):
    environ = {} if allowed is None else {"DJANGO_ALLOWED_HOSTS": allowed}
    assert healthcheck.host_header(environ) == host


class _Health(BaseHTTPRequestHandler):
    status = 200
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Host")))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    _Health.seen = []
    _Health.status = 200
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_web_asks_live_endpoint_with_allowed_host(healthcheck, health_server):
    port = health_server.server_address[1]
    environ = {"QW_BIND": f"0.0.0.0:{port}", "DJANGO_ALLOWED_HOSTS": "api.example.com"}
    assert healthcheck.check_web(environ) is True
    assert _Health.seen == [("/api/health/live/", "api.example.com")]
    _Health.status = 503
    assert healthcheck.check_web(environ) is False


def test_healthcheck_web_unhealthy_when_nothing_listens(healthcheck, health_server):
    port = health_server.server_address[1]
    health_server.shutdown()
    health_server.server_close()
    assert healthcheck.check_web({"QW_BIND": f"0.0.0.0:{port}"}) is False


def test_healthcheck_flower_asks_its_healthcheck(healthcheck, health_server):
    assert healthcheck.check_flower({"FLOWER_PORT": str(health_server.server_address[1])})
    assert _Health.seen[0][0] == "/healthcheck"


def test_the_app_answers_the_healthcheck_host_and_refuses_a_bare_ip(healthcheck, client, settings):
    # Django answers 400 to a Host outside ALLOWED_HOSTS: the check must send one it accepts
    settings.ALLOWED_HOSTS = ["api.example.com", "localhost"]
    environ = {"DJANGO_ALLOWED_HOSTS": ",".join(settings.ALLOWED_HOSTS)}
    ok = client.get("/api/health/live/", HTTP_HOST=healthcheck.host_header(environ))
    assert ok.status_code == 200
    assert client.get("/api/health/live/", HTTP_HOST="10.1.2.3:8000").status_code == 400


def test_gunicorn_config_binds_qw_bind_and_never_writes_the_root_filesystem(monkeypatch):
    from gunicorn.config import Config

    monkeypatch.setenv("QW_BIND", "0.0.0.0:9000")
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    config: dict[str, object] = {}
    exec((ROOT / "docker" / "gunicorn.conf.py").read_text(), config)
    assert config["bind"] == "0.0.0.0:9000"
    assert config["workers"] == 3
    assert config["worker_tmp_dir"] == "/dev/shm"
    assert config["control_socket_disable"] is True
    assert config["accesslog"] == "-"
    # gunicorn ignores unknown names in a config file: every one must be a real setting
    names = {k for k in config if not k.startswith("_")} - {"os", "annotations"}
    assert names <= set(Config().settings), names - set(Config().settings)
