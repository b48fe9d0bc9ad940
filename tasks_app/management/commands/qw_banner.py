"""Printed by ``make run`` before the processes start: where things are and how to log in."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Print QueueWorker's URLs, its mode, and how to get an API token."

    def handle(self, *args: Any, **options: Any) -> None:
        bind = os.environ.get("QW_BIND", "127.0.0.1:8000")
        flower = os.environ.get("FLOWER_PORT", "5555")
        embedded = settings.IS_EMBEDDED_BROKER or not settings.IS_POSTGRES
        mode = (
            "embedded demo mode (SQLite + filesystem broker; see README for what it lacks)"
            if embedded
            else "PostgreSQL + RabbitMQ"
        )
        self.stdout.write(
            "\n".join(
                [
                    "",
                    f"QueueWorker — {mode}",
                    f"  API       http://{bind}/api/tasks/",
                    f"  API docs  http://{bind}/api/docs/",
                    f"  Admin     http://{bind}/admin/",
                    f"  Flower    http://127.0.0.1:{flower}/",
                    "  Get a token (in another terminal):",
                    "    .venv/bin/python manage.py createsuperuser",
                    "    .venv/bin/python manage.py drf_create_token <username>",
                    "",
                ]
            )
        )
