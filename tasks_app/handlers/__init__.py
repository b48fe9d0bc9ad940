"""Task handlers: one module per type, registered with ``registry``."""

from __future__ import annotations

from importlib import import_module

from django.conf import settings

from tasks_app.handlers import (  # noqa: F401  # register the built-ins
    compensation,
    data_processing,
    http,
    noop,
)
from tasks_app.handlers.registry import HandlerSpec, register, registry

__all__ = ["HandlerSpec", "register", "registry"]

for _module in getattr(settings, "QW_HANDLER_MODULES", []):
    import_module(_module)
