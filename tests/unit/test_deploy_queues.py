"""Every worker command in the Procfile, the Dockerfile, compose.yaml and deploy/ names only queues
that the Celery configuration declares, never consumes ``tasks.dead_letter`` as work, and
together the worker groups of each deployment consume every declared work queue.
"""

from __future__ import annotations

import pytest
import yaml
from django.conf import settings

from queueworker import messaging
from tests.unit._deploy import (
    DEPLOY,
    OVERLAYS,
    ROOT,
    by_kind,
    containers,
    load_yaml_documents,
    manifest_files,
    pod_specs,
    queues_in,
    rendered,
    shell_words,
)

DECLARED = {queue.name for queue in settings.CELERY_TASK_QUEUES}


def _argv_lists(value) -> list[list[str]]:
    """Every list of strings (a command or args) anywhere in a YAML document."""
    found: list[list[str]] = []
    if isinstance(value, dict):
        for item in value.values():
            found.extend(_argv_lists(item))
    elif isinstance(value, list):
        if value and all(isinstance(item, str) for item in value):
            found.append(value)
        for item in value:
            found.extend(_argv_lists(item))
    return found


def _commands() -> dict[str, list[list[str]]]:
    """Commands by file: the text files' words, and the YAML files' argv lists."""
    commands: dict[str, list[list[str]]] = {
        "Procfile": [
            shell_words(line.partition(":")[2])
            for line in (ROOT / "Procfile").read_text().splitlines()
        ],
        "Dockerfile": [shell_words((ROOT / "Dockerfile").read_text())],
        "docker/entrypoint.sh": [shell_words((ROOT / "docker" / "entrypoint.sh").read_text())],
        "compose.yaml": _argv_lists(yaml.safe_load((ROOT / "compose.yaml").read_text())),
    }
    for path in manifest_files():
        lists = [argv for doc in load_yaml_documents(path) for argv in _argv_lists(doc)]
        commands[str(path.relative_to(ROOT))] = lists
    return commands


def _keda_queues(value) -> list[str]:
    if isinstance(value, dict):
        own = [value["queueName"]] if isinstance(value.get("queueName"), str) else []
        return own + [q for item in value.values() for q in _keda_queues(item)]
    if isinstance(value, list):
        return [q for item in value for q in _keda_queues(item)]
    return []


def test_the_declared_queues_are_the_contract():
    assert set(messaging.STANDARD_QUEUES) <= DECLARED
    assert messaging.DEAD_LETTER_QUEUE not in DECLARED


def test_every_named_queue_is_declared_and_none_is_the_dead_letter_queue():
    named: dict[str, list[str]] = {}
    for source, argvs in _commands().items():
        for argv in argvs:
            for queue in queues_in(argv):
                named.setdefault(source, []).append(queue)
    for path in manifest_files():
        for document in load_yaml_documents(path):
            for queue in _keda_queues(document):
                named.setdefault(str(path.relative_to(ROOT)), []).append(queue)
    # the parser found the worker commands (the test is not vacuous)
    assert sorted(named["compose.yaml"]) == sorted(messaging.STANDARD_QUEUES)
    assert any(source.startswith("deploy/base/worker-") for source in named)
    assert any(source.startswith("deploy/components/keda/") for source in named)
    for source, queues in named.items():
        for queue in queues:
            assert queue in DECLARED, f"{source}: -Q {queue} is not a declared queue"
            assert queue != messaging.DEAD_LETTER_QUEUE, f"{source} consumes the dead letters"


def test_the_procfile_worker_consumes_every_work_queue():
    (worker,) = [
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("worker:")
    ]
    # without -Q, Celery consumes CELERY_TASK_QUEUES: every work queue, not the dead letters
    assert queues_in(shell_words(worker.partition(":")[2])) == []


def test_compose_worker_groups_cover_every_declared_queue_once():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    consumed = [
        queue
        for service in services.values()
        if service.get("command", [None])[0] == "worker"
        for queue in queues_in(service["command"])
    ]
    assert sorted(consumed) == sorted(DECLARED)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_worker_groups_cover_every_declared_queue_once(overlay):
    resources = rendered(overlay)
    consumed = [
        queue
        for resource in resources
        for pod in pod_specs(resource)
        for container in containers(pod)
        if container.get("args", [None])[0] == "worker"
        for queue in queues_in(container["args"])
    ]
    assert sorted(consumed) == sorted(DECLARED)


def test_keda_scales_each_worker_on_the_queues_it_consumes():
    resources = rendered("prod")
    deployments = by_kind(resources, "Deployment")
    for name, scaled in by_kind(resources, "ScaledObject").items():
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        args = target["spec"]["template"]["spec"]["containers"][0]["args"]
        assert _keda_queues(scaled) == queues_in(args), name


@pytest.mark.parametrize(
    ("argv", "queues"),
    [
        (["worker", "-Q", "a,b"], ["a", "b"]),
        (["celery", "worker", "--queues", "a"], ["a"]),
        (["celery", "worker", "--queues=a,b"], ["a", "b"]),
        (["celery", "worker", "-Qa"], ["a"]),
        (["celery", "worker", "--loglevel", "info"], []),
    ],
)
def test_queue_option_parser(argv, queues):
    assert queues_in(argv) == queues


def test_deploy_tree_has_the_three_worker_groups():
    names = sorted(p.name for p in (DEPLOY / "base").glob("worker-*.yaml"))
    assert names == ["worker-data.yaml", "worker-default.yaml", "worker-http.yaml"]
