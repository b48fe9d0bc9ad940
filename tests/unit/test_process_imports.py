"""Only the worker loads Polars: the web, beat and Flower validate DATA_PROCESSING payloads but
never run a pipeline, so they import the payload check and not the engine (docs/performance.md,
"Process sizes"). Each check runs in a fresh interpreter, since this test session itself has
imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SETUP = """
import json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "queueworker.settings")
import django
django.setup()
"""

_WEB_AND_BEAT = """
import importlib
from celery.utils.imports import symbol_by_name
from queueworker.celery import app
for name in (
    "queueworker.wsgi", "queueworker.urls",
    "tasks_app.api.views", "tasks_app.api.serializers", "tasks_app.api.queues",
    "workflows_app.api.views", "workflows_app.api.serializers", "workflows_app.api.schedules",
    "tasks_app.handlers",
):
    importlib.import_module(name)
from django.urls import get_resolver
get_resolver().url_patterns  # the URLconf, as the first request loads it
app.loader.import_default_modules()  # what beat and Flower import: the task modules
symbol_by_name(app.conf.beat_scheduler)
from tasks_app.handlers import registry
print(json.dumps({
    "polars": "polars" in sys.modules,
    "pyarrow": "pyarrow" in sys.modules,
    "data_processing": "DATA_PROCESSING" in registry,
}))
"""

_WORKER = """
from celery import signals
from queueworker.celery import app
from tasks_app import worker_signals
from tasks_app.handlers import registry
app.loader.import_default_modules()
connected = any(
    getattr(receiver(), "__name__", "") == "_load_data_engine"
    for _, receiver in signals.worker_init.receivers
)
worker_signals._load_data_engine()
print(json.dumps({
    "polars": "polars" in sys.modules,
    "connected": connected,
    "data_processing": "DATA_PROCESSING" in registry,
    "chord_tasks": sorted(n for n in app.tasks if n.startswith("tasks_app.data_")),
}))
"""


def _run(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _SETUP + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_web_beat_and_flower_imports_leave_polars_out():
    # given a fresh process that loads what gunicorn, beat and Flower load
    # when it has imported the WSGI app, the URLconf, the API and the Celery task modules
    loaded = _run(_WEB_AND_BEAT)

    # then DATA_PROCESSING is registered (its payloads are checked at create) without Polars
    assert loaded["data_processing"] is True
    assert loaded["polars"] is False
    assert loaded["pyarrow"] is False


def test_the_worker_loads_the_engine_at_start():
    # given a fresh process with the worker's task modules
    # when the worker's start-up handler runs
    loaded = _run(_WORKER)

    # then it is connected to worker_init, Polars is loaded and the pipeline tasks exist
    assert loaded["connected"] is True
    assert loaded["polars"] is True
    assert loaded["data_processing"] is True
    assert loaded["chord_tasks"] == ["tasks_app.data_batch", "tasks_app.data_merge"]
