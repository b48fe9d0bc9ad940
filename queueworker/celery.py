"""The Celery application (Celery's own Django example, plus the broker topology)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "queueworker.settings")

app = Celery("queueworker")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Connects the worker's signal handlers (the engine's connect in tasks_app's ready()).
import queueworker.worker_signals  # noqa: E402,F401
