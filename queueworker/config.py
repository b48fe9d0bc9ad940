"""Typed readers for environment settings that fail loudly on bad values.

Every reader names the variable and the value it could not use, so a typo in a deployment
stops the process at start with a message instead of surfacing later as odd behaviour.
A ``<NAME>_FILE`` variable, when set, is read instead of ``<NAME>`` (for mounted secrets).
"""

from __future__ import annotations

import builtins
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.core.management.utils import get_random_secret_key

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_RATE = re.compile(r"^\d+/(s|sec|second|m|min|minute|h|hour|d|day)$")


class Env:
    """Reads settings from a mapping (``os.environ`` by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def raw(self, name: builtins.str) -> builtins.str | None:
        file_path = self.environ.get(f"{name}_FILE")
        if file_path:
            try:
                return Path(file_path).read_text().strip()
            except OSError as exc:
                raise ImproperlyConfigured(
                    f"{name}_FILE: cannot read {file_path!r}: {exc}"
                ) from exc
        return self.environ.get(name)

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self.raw(name)
        return default if value is None or value == "" else value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self.raw(name)
        if value is None or value.strip() == "":
            return default
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ImproperlyConfigured(f"{name} must be true or false, got {value!r}")

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self.raw(name)
        if value is None or value.strip() == "":
            return default
        try:
            number = int(value.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
        return _bounded(name, number, minimum, maximum)

    def float(
        self,
        name: builtins.str,
        default: builtins.float,
        *,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
    ) -> builtins.float:
        value = self.raw(name)
        if value is None or value.strip() == "":
            return default
        try:
            number = float(value.strip())
        except ValueError:
            raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ImproperlyConfigured(f"{name} must be a finite number, got {value!r}")
        return _bounded(name, number, minimum, maximum)

    def list(
        self, name: builtins.str, default: builtins.list[builtins.str]
    ) -> builtins.list[builtins.str]:
        value = self.raw(name)
        if value is None:
            return list(default)
        return [item.strip() for item in value.split(",") if item.strip()]

    def choice(
        self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]
    ) -> builtins.str:
        value = self.str(name, default).strip().lower()
        if value not in choices:
            raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def json(self, name: builtins.str, default: dict[builtins.str, Any]) -> dict[builtins.str, Any]:
        """A JSON object (e.g. a storage backend's options)."""
        value = self.raw(name)
        if value is None or value.strip() == "":
            return dict(default)
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name} must be a JSON object: {exc}") from None
        if not isinstance(parsed, dict):
            raise ImproperlyConfigured(f"{name} must be a JSON object, got {value!r}")
        return parsed

    def rate(self, name: builtins.str, default: builtins.str | None) -> builtins.str | None:
        value = self.raw(name)
        if value is None or value.strip() == "":
            return default
        if not _RATE.match(value.strip()):
            raise ImproperlyConfigured(
                f"{name} must be a rate such as '50/second' or '1000/minute', got {value!r}"
            )
        return value.strip()


N = TypeVar("N", int, float)


def _bounded(name: str, number: N, minimum: N | None, maximum: N | None) -> N:
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, got {number}")
    return number


def local_secret_key(path: Path) -> str:
    """This installation's own secret key, made once and kept in ``path`` (mode 0600).

    For the embedded demo and DEBUG development, which start with nothing configured: every
    process on the host (web, worker, beat) reads the same key, and no two installations share
    one. The key is written under a temporary name and hard-linked into place, so processes
    that start together all end up with the first one made.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # 0600
        try:
            with os.fdopen(fd, "w") as file:
                file.write(get_random_secret_key())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            os.unlink(temporary)
    key = path.read_text().strip()
    if not key:
        raise ImproperlyConfigured(f"{path} is empty: delete it to make a new secret key")
    return key
