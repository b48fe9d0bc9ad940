"""The forge's CI (.github/workflows/ci.yml) is a valid GitHub workflow, runs what .ci/run runs,
and the pre-commit hooks use the ruff of uv.lock.

The workflow schema is SchemaStore's github-workflow.json (tests/schemas/README.md says where it
comes from), validated offline.
"""

from __future__ import annotations

import json
import shlex
import tomllib

import jsonschema
import pytest
import yaml

from tests import manual

ROOT = manual.ROOT
WORKFLOW_FILE = ROOT / ".github" / "workflows" / "ci.yml"
SCHEMA = json.loads((ROOT / "tests" / "schemas" / "github-workflows.json").read_text())


def _workflow() -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads it as the string "on"
    loaded = yaml.safe_load(WORKFLOW_FILE.read_text())
    return {("on" if key is True else key): value for key, value in loaded.items()}


def _make_calls(script: str) -> set[str]:
    """`make <target> [VAR=value …]` lines of a shell script, as written (install excluded)."""
    calls = set()
    for line in script.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("make "):
            continue
        words = shlex.split(line)
        if words[1:2] != ["install"]:
            calls.add(" ".join(words))
    return calls


def _workflow_make_calls() -> set[str]:
    calls = set()
    for job in _workflow()["jobs"].values():
        for step in job.get("steps", []):
            calls |= _make_calls(step.get("run", ""))
    return calls


def test_workflow_is_valid_against_the_github_workflow_schema():
    jsonschema.validate(_workflow(), SCHEMA, cls=jsonschema.Draft7Validator)


def test_schema_still_refuses_a_broken_workflow():
    broken = _workflow()
    broken["jobs"]["lint"]["runs_on"] = broken["jobs"]["lint"].pop("runs-on")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft7Validator)


def test_workflow_runs_the_same_make_targets_as_ci_run():
    ci_run = _make_calls((ROOT / ".ci" / "run").read_text())
    assert {"make lint", "make docs", "make test", "make chaos QW_CHAOS_SCALE=0.1"} <= ci_run
    assert _workflow_make_calls() == ci_run


def test_service_jobs_point_the_tests_at_their_containers():
    jobs = _workflow()["jobs"]
    for name in ("test", "chaos"):
        job = jobs[name]
        assert {"postgres", "rabbitmq"} <= set(job["services"]), name
        # the variables tests/session_env.py reads, at the ports the services publish
        assert job["env"]["DATABASE_URL"].startswith("postgres://postgres@127.0.0.1:5432/")
        assert job["env"]["CELERY_BROKER_URL"].startswith("amqp://guest:guest@127.0.0.1:5672/")
        ports = {p.split(":")[0] for s in job["services"].values() for p in s.get("ports", [])}
        assert {"5432", "5672"} <= ports
        steps = "\n".join(step.get("run", "") for step in job["steps"])
        assert "rabbitmqctl" in steps, "the sessions make their vhosts with rabbitmqctl"
    assert _workflow()["env"]["CI"] == "true"


def test_pre_commit_pins_the_locked_ruff():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (ruff,) = [p["version"] for p in lock["package"] if p["name"] == "ruff"]
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    (repo,) = [r for r in config["repos"] if r["repo"].endswith("/ruff-pre-commit")]
    assert repo["rev"] == f"v{ruff}"
    assert {hook["id"] for hook in repo["hooks"]} == {"ruff-check", "ruff-format"}
