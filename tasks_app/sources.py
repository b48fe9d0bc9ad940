"""Where a DATA_PROCESSING task's rows come from: inline records, a URL, an artifact, a task.

A URL is fetched through the HTTP_REQUEST type's guarded client (the SSRF guard checks the
resolved address of every connection and every redirect) and streamed to a local temporary
file: memory never holds the whole source. Neither the bytes received nor the bytes they
decode to (``Content-Encoding``) may pass ``QW_DATA_MAX_SOURCE_BYTES``, and past the first
MiB the decoded bytes may not exceed ``QW_DATA_MAX_COMPRESSION_RATIO`` times the bytes
received: the body is read and decoded ``CHUNK_BYTES`` at a time, and the fetch stops at the
first chunk that breaks a rule, before it is written. A small compressed body cannot fill the
disk: a 150 KB gzip body of 150 MiB stops after 6.25 MiB.
An artifact or another task's result must belong to the task's owner.
"""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import requests
from django.conf import settings
from requests.exceptions import ChunkedEncodingError, ContentDecodingError

from tasks_app import artifacts
from tasks_app.errors import PermanentError, RetryableError
from tasks_app.http import client
from tasks_app.http.guard import DestinationRefused
from tasks_app.models import Artifact, Task, TaskStatus

FORMATS = ("csv", "json", "jsonl")
_BY_CONTENT_TYPE = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/json": "json",
    "application/x-ndjson": "jsonl",
    "application/ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
}
_BY_EXTENSION = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 64 * 1024  # urllib3 reads about this much off the wire per decoded chunk
RATIO_FREE_BYTES = 1024 * 1024  # a body that decodes to less is never judged by its ratio


@dataclass
class Source:
    """Rows to stage: inline ``records``, or a seekable binary ``file`` in ``fmt`` (``name``:
    its name in the artifacts storage, when it is stored there already)."""

    description: str
    records: list[Any] | None = None
    file: IO[bytes] | None = None
    fmt: str = "json"
    name: str | None = None


def reference(payload: dict[str, Any]) -> dict[str, str]:
    """The payload's ``source`` as ``{"url"|"artifact"|"task": value}``."""
    source = payload["source"]
    return {"url": source} if isinstance(source, str) else dict(source)


@contextmanager
def opened(task: Task, payload: dict[str, Any]) -> Iterator[Source]:
    if "records" in payload:
        yield Source("inline records", records=payload["records"])
        return
    ref = reference(payload)
    given = payload.get("format")
    if "url" in ref:
        with _downloaded(ref["url"], task) as (file, content_type):
            fmt = given or _format_of(content_type, ref["url"])
            yield Source(f"url {ref['url']}", file=file, fmt=fmt)
    elif "artifact" in ref:
        with _artifact(ref["artifact"], task.owner_id, given) as source:
            yield source
    else:
        yield from _task_result(ref["task"], task, given)


def _format_of(content_type: str, url: str) -> str:
    media = content_type.split(";")[0].strip().lower()
    if media in _BY_CONTENT_TYPE:
        return _BY_CONTENT_TYPE[media]
    extension = posixpath.splitext(urlsplit(url).path)[1].lower()
    if extension in _BY_EXTENSION:
        return _BY_EXTENSION[extension]
    raise PermanentError(
        f"format: cannot tell the source's format from its Content-Type {media!r} or its URL; "
        f"give format ({', '.join(FORMATS)})"
    )


@contextmanager
def _downloaded(url: str, task: Task) -> Iterator[tuple[IO[bytes], str]]:
    # Named, so that a CSV staged on a local artifacts disk is linked there, not copied.
    with tempfile.NamedTemporaryFile() as file:
        content_type = fetch(url, file, timeout_s=min(settings.QW_HTTP_TIMEOUT_S, task.timeout_s))
        file.seek(0)
        yield file, content_type


def fetch(url: str, file: IO[bytes], *, timeout_s: float) -> str:
    """Write the decoded body of ``url`` to ``file`` within the caps (see the module
    docstring); return its Content-Type."""
    http = client.session(settings.QW_HTTP_ALLOWED_HOSTS)
    out = client.Outgoing(
        method="GET", url=url, timeout_s=timeout_s, max_redirects=settings.QW_HTTP_MAX_REDIRECTS
    )
    try:
        response, _ = client.open_response(http, out)
    except DestinationRefused as exc:
        raise PermanentError(f"source.url: {exc}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise RetryableError(f"source.url: {type(exc).__name__}: {exc}") from None
    except (requests.RequestException, ValueError) as exc:
        raise PermanentError(f"source.url: {exc}") from None
    try:
        if response.status_code in RETRY_STATUS:
            raise RetryableError(f"source.url answered {response.status_code}")
        if not 200 <= response.status_code < 300:
            raise PermanentError(f"source.url answered {response.status_code}")
        _copy_capped(response, file)
    except (requests.ConnectionError, requests.Timeout, ChunkedEncodingError) as exc:
        raise RetryableError(f"source.url: reading the body: {exc}") from None
    except ContentDecodingError as exc:
        raise PermanentError(f"source.url: cannot decode the body: {exc}") from None
    finally:
        response.close()
    return response.headers.get("Content-Type", "")


def _copy_capped(response: requests.Response, file: IO[bytes]) -> None:
    cap = settings.QW_DATA_MAX_SOURCE_BYTES
    ratio = settings.QW_DATA_MAX_COMPRESSION_RATIO
    too_large = f"source.url: larger than QW_DATA_MAX_SOURCE_BYTES ({cap} bytes)"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > cap:
        raise PermanentError(too_large)
    decoded = 0
    for chunk in response.iter_content(CHUNK_BYTES):
        decoded += len(chunk)
        received = _received(response)
        if decoded > cap or received > cap:
            raise PermanentError(too_large)
        if ratio and decoded > RATIO_FREE_BYTES and decoded > ratio * received:
            raise PermanentError(
                f"source.url: decodes to more than QW_DATA_MAX_COMPRESSION_RATIO ({ratio}) "
                "times the bytes received"
            )
        file.write(chunk)
    if _received(response) > cap:  # a body that decodes to (almost) nothing
        raise PermanentError(too_large)


def _received(response: requests.Response) -> int:
    """The bytes read off the connection so far: urllib3 counts them before decoding."""
    return int(response.raw.tell())


@contextmanager
def _artifact(artifact_id: str, owner_id: Any, given: str | None) -> Iterator[Source]:
    artifact = Artifact.objects.filter(pk=artifact_id, owner_id=owner_id).first()
    if artifact is None:
        raise PermanentError(f"source.artifact: no artifact {artifact_id} (expired or not yours)")
    try:
        with artifacts.reading(artifact.name) as file:
            yield Source(
                f"artifact {artifact.id}",
                file=file,
                fmt=given or artifact.format,
                name=artifact.name,
            )
    except FileNotFoundError:
        raise PermanentError(f"source.artifact: the file of {artifact.id} is gone") from None


def _task_result(task_id: str, task: Task, given: str | None) -> Iterator[Source]:
    other = Task.objects.filter(pk=task_id, owner_id=task.owner_id).first()
    if other is None:
        raise PermanentError(f"source.task: no task {task_id}")
    if other.status != TaskStatus.COMPLETED:
        raise PermanentError(f"source.task: task {task_id} is {other.status}, not COMPLETED")
    result = other.result
    if isinstance(result, dict) and isinstance(result.get("artifact"), dict):
        with _artifact(result["artifact"].get("id", ""), task.owner_id, given) as source:
            yield source
        return
    for rows in (
        result,
        result.get("rows") if isinstance(result, dict) else None,
        result.get("json") if isinstance(result, dict) else None,  # an HTTP_REQUEST's body
    ):
        if isinstance(rows, list):
            yield Source(f"task {task_id}", records=rows)
            return
    raise PermanentError(
        f"source.task: the result of task {task_id} holds no rows (a list, rows, json or artifact)"
    )


def owner_problems(payload: Any, owner: Any) -> list[tuple[str, str]]:
    """At create: a referenced artifact or task must exist and be the creator's."""
    if not isinstance(payload, dict) or "source" not in payload:
        return []
    ref = reference(payload)
    if "artifact" in ref and not Artifact.objects.filter(pk=ref["artifact"], owner=owner).exists():
        return [("source.artifact", f"no artifact {ref['artifact']}")]
    if "task" in ref and not Task.objects.filter(pk=ref["task"], owner=owner).exists():
        return [("source.task", f"no task {ref['task']}")]
    return []
