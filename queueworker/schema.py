"""OpenAPI additions contributed by the apps (drf-spectacular's ``POSTPROCESSING_HOOKS`` names
``apply_contributions``): the project's schema knows no app, each adds what only it knows (the
engine: each task type's payload schema) with ``register_postprocessor`` in its ``ready()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Postprocessor = Callable[..., dict[str, Any]]

_postprocessors: list[Postprocessor] = []


def register_postprocessor(postprocessor: Postprocessor) -> None:
    """Run ``postprocessor(result, **kwargs)`` (drf-spectacular's hook signature) on every
    generated document, in the order registered; once each."""
    if postprocessor not in _postprocessors:
        _postprocessors.append(postprocessor)


def apply_contributions(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    for postprocessor in _postprocessors:
        result = postprocessor(result, **kwargs)
    return result
