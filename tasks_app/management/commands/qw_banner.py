"""Printed by ``make run`` before the processes start: where things are and how to log in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

# Written by `make run` when FLOWER_BASIC_AUTH is not set (see the Makefile).
FLOWER_AUTH_FILE = "flower-auth"


def flower_login_hint(basic_auth: str, auth_file: Path) -> str:
    """Who logs in to Flower and where the password is; never the password itself."""
    if basic_auth:
        user = basic_auth.split(",")[0].partition(":")[0]
        return f"user {user}, password from FLOWER_BASIC_AUTH"
    try:
        user = auth_file.read_text().strip().partition(":")[0]
    except OSError:
        return "set FLOWER_BASIC_AUTH=user:password"
    return f"user {user}, password in {auth_file}"


class Command(BaseCommand):
    help = "Print QueueWorker's URLs, its mode, and how to get an API token."

    def handle(self, *args: Any, **options: Any) -> None:
        bind = os.environ.get("QW_BIND", "127.0.0.1:8000")
        flower = os.environ.get("FLOWER_PORT", "5555")
        flower_login = flower_login_hint(
            os.environ.get("FLOWER_BASIC_AUTH", ""), settings.VAR_DIR / FLOWER_AUTH_FILE
        )
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
                    f"  Flower    http://127.0.0.1:{flower}/  ({flower_login})",
                    "  Get a token (in another terminal):",
                    "    .venv/bin/python manage.py createsuperuser",
                    "    .venv/bin/python manage.py drf_create_token <username>",
                    "",
                ]
            )
        )
