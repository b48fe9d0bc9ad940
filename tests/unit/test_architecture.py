"""Dependencies point one way: ``queueworker`` (the project's wiring) <- ``tasks_app`` (the
engine) <- ``workflows_app``. The engine imports nothing of workflows; the project package
names app modules only in ``urls.py`` (and by dotted string in its settings); apps reach the
layers below through extension points they fill in their ``AppConfig.ready()`` (docs/
architecture.md): the engine's hooks and worker signals, the project's metrics, health and
schema registries.

The graph is ``tests.support.import_graph``'s: every import counts, inside functions too.
There is no import cycle.
"""

from __future__ import annotations

import pytest
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from queueworker import health, metrics, schema
from tasks_app import dispatcher, hooks, worker_signals
from tasks_app import metrics as task_metrics
from tasks_app.api import schema as task_schema
from tasks_app.models import Task
from tests.support.import_graph import cycles, graph, imports_of, modules
from workflows_app import metrics as run_metrics
from workflows_app import scheduler
from workflows_app.coordinator import RunObserver
from workflows_app.recovery import reconcile_runs


def _package(module: str) -> str:
    return module.split(".")[0]


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return graph()


def test_the_engine_imports_no_workflow_module(edges):
    # given every module of the engine, with the modules it imports
    engine = {m: targets for m, targets in edges.items() if _package(m) == "tasks_app"}

    # then none of them is a workflows module
    upward = {
        (m, t) for m, targets in engine.items() for t in targets if _package(t) == "workflows_app"
    }
    assert engine and upward == set()


def test_the_project_package_imports_app_modules_only_from_urls(edges):
    # given the project package's modules other than the URL configuration
    wiring = {
        m: t for m, t in edges.items() if _package(m) == "queueworker" and m != "queueworker.urls"
    }

    # then they import no module of an app
    into_apps = {
        (m, t) for m, targets in wiring.items() for t in targets if _package(t) != "queueworker"
    }
    assert wiring and into_apps == set()


def test_no_import_cycle(edges):
    assert cycles(edges) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    # given a module that imports a workflows module only inside a function
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workflows_app import coordinator\n")

    # then the scan counts it
    targets = imports_of("tasks_app.m", module, modules())
    assert "workflows_app.coordinator" in targets


def test_the_scan_finds_a_cycle():
    # given two modules that import each other, and a third that only imports one of them
    edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}

    # then the cycle is those two
    assert cycles(edges) == [["a", "b"]]


def _ready_again() -> None:
    """Run the apps' ready() again, as a test runner may."""
    for label in ("tasks_app", "workflows_app"):
        apps.get_app_config(label).ready()


def test_workflows_register_their_observer_and_reconciler_once():
    # when the apps' ready() runs again
    _ready_again()

    # then the engine knows one run observer and the run reconciler, each once
    assert [type(o) for o in hooks._observers].count(RunObserver) == 1
    assert hooks._reconcilers.count(reconcile_runs) == 1


def test_each_app_contributes_its_metrics_once():
    # when the apps' ready() runs again
    _ready_again()

    # then the scrape has the engine's collector, then workflows', each once
    kinds = [type(c) for c in metrics._collectors]
    assert kinds == [task_metrics.TaskCollector, run_metrics.RunCollector]
    # and /api/metrics/ the engine's section, then workflows'
    assert metrics._summaries == [task_metrics.task_summary, run_metrics.run_summary]


def test_the_engine_contributes_the_dispatcher_check_and_the_payload_schemas():
    # when the apps' ready() runs again
    _ready_again()

    # then /api/health/ checks the dispatcher between the broker and the workers
    full = list(health.HealthView().checks)
    assert full == ["database", "broker", "dispatcher", "workers", "queues"]
    assert health.HealthView().checks["dispatcher"] is dispatcher.health_check
    # and ready/ reports it without failing on it
    assert list(health.ReadyView().checks) == ["database", "broker", "dispatcher"]
    assert health.ReadyView().advisory == frozenset({"dispatcher"})
    # and the schema gets the task types' payload schemas, once
    assert schema._postprocessors == [task_schema.add_payload_schemas]


def test_workflows_register_their_beat_check_once():
    # when the apps' ready() runs again
    _ready_again()

    # then beat runs workflows' scheduler check, once
    assert worker_signals._beat_checks == [scheduler.ensure_project_scheduler]


def test_a_beat_check_that_stops_beat_runs_before_the_dispatcher_starts(monkeypatch):
    # given a beat check that refuses, and a dispatcher that records whether it started
    started: list[str] = []
    monkeypatch.setattr(worker_signals.dispatcher, "start", started.append)

    def refuse(service: object) -> None:
        raise SystemExit("no")

    monkeypatch.setattr(worker_signals, "_beat_checks", [refuse])

    # when beat starts
    with pytest.raises(SystemExit):
        worker_signals._beat_init(sender=object())

    # then the dispatcher never started in it
    assert started == []


@pytest.mark.django_db
def test_a_task_of_no_run_costs_the_observers_no_statement():
    task = Task(type="NOOP", payload={})
    with CaptureQueriesContext(connection) as queries:
        observed = hooks.observed(task)
        hooks.Terminal(task).finished(task)
    assert observed is False
    assert len(queries) == 0
