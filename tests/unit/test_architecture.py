"""The engine does not depend on the apps built on it: the paths that record a task's outcome
(the worker, the services, the recovery sweep, the dispatcher, the state machine) import
nothing of ``workflows_app``; workflows follow them through ``tasks_app.hooks``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasks_app import hooks
from tasks_app.models import Task
from workflows_app.coordinator import RunObserver
from workflows_app.recovery import reconcile_runs

ROOT = Path(__file__).resolve().parents[2]
ENGINE_OUTCOME_PATHS = [
    "tasks_app/worker.py",
    "tasks_app/services.py",
    "tasks_app/recovery.py",
    "tasks_app/dispatcher.py",
    "tasks_app/state.py",
    "tasks_app/hooks.py",
]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("relative", ENGINE_OUTCOME_PATHS)
def test_the_engines_outcome_paths_import_no_workflow_module(relative):
    imports = imported_modules(ROOT / relative)
    assert not {name for name in imports if name.split(".")[0] == "workflows_app"}, imports


def test_the_scan_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workflows_app import coordinator\n")
    assert "workflows_app" in imported_modules(module)


def test_workflows_register_their_observer_and_reconciler_once():
    # when the app's ready() runs again (as a test runner may make it)
    from django.apps import apps

    apps.get_app_config("workflows_app").ready()

    # then the engine knows one run observer and the run reconciler, each once
    assert [type(o) for o in hooks._observers].count(RunObserver) == 1
    assert hooks._reconcilers.count(reconcile_runs) == 1


@pytest.mark.django_db
def test_a_task_of_no_run_costs_the_observers_no_statement():
    task = Task(type="NOOP", payload={})
    with CaptureQueriesContext(connection) as queries:
        observed = hooks.observed(task)
        hooks.Terminal(task).finished(task)
    assert observed is False
    assert len(queries) == 0
