"""Artifacts: files of rows in the ``artifacts`` storage (Django's storage API).

Two kinds of names live there:

- ``work/<task id>/…``: a DATA_PROCESSING task's staged input batches and batch outputs. They
  belong to the task while it runs and are deleted when it finishes (and by the expiry sweep,
  for a task whose worker died at the wrong moment).
- ``results/<task id>/<artifact id>.<ext>``: outputs, each with an ``Artifact`` row that says
  whose it is and when it expires (``QW_ARTIFACT_TTL_DAYS``). A later task may read one as its
  source; ``GET /api/tasks/{id}/result/`` streams it.

Writers stage through a local temporary file and hand it to ``Storage.save``: a local folder or
S3 alike, and a batch in memory is never copied a second time.

An owner's artifacts may hold at most ``QW_ARTIFACT_QUOTA_BYTES`` together (0: no limit),
summed from the ``Artifact`` rows. A new artifact is checked and its row inserted under a lock
of its owner before its file is saved, so that two tasks finishing at once cannot both slip
under the quota; a task's staged input counts against it while the task stages it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import IO, Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.db import connection, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from tasks_app.errors import PermanentError
from tasks_app.models import TERMINAL_STATUSES, Artifact, DataJob, Task, TaskStatus

logger = logging.getLogger(__name__)

CONTENT_TYPES = {
    "jsonl": "application/x-ndjson",
    "json": "application/json",
    "csv": "text/csv",
}
SPOOL_BYTES = 8 * 1024 * 1024  # kept in memory below this, spilled to a temporary file above
EXPIRE_BATCH = 500
WORK_GRACE = timedelta(hours=1)


def storage() -> Storage:
    return storages["artifacts"]


def work_prefix(task_id: Any) -> str:
    return f"work/{task_id}"


def write(name: str, fill: Callable[[IO[bytes]], None]) -> tuple[str, int]:
    """Write a file through ``fill(file)`` and save it as ``name``; return (saved name, size).

    A name that exists is replaced: a batch that runs twice rewrites its own output.
    """
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as buffer:
        fill(buffer)
        return save(name, buffer)


def save(name: str, file: IO[bytes]) -> tuple[str, int]:
    """Save the whole of ``file`` as ``name`` (replacing it); return (saved name, size).

    A named file on the disk of a local storage is hard-linked there rather than copied (a
    downloaded CSV source of 104 MB: no copy instead of 40 ms of CPU and 100 ms or more of
    writing, before any batch can start); the file must not change afterwards.
    """
    size = file.seek(0, 2)
    file.seek(0)
    store = storage()
    if store.exists(name):
        store.delete(name)
    if _linked(store, name, file):
        return name, size
    return store.save(name, File(file, name=name)), size


def _linked(store: Storage, name: str, file: IO[bytes]) -> bool:
    """Whether ``file`` could be hard-linked as ``name`` (a local storage, the same disk)."""
    source = getattr(file, "name", None)
    if not isinstance(store, FileSystemStorage) or not isinstance(source, str):
        return False
    target = store.path(name)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(source, target)
    except OSError:  # another disk, a file system without links, a name taken meanwhile
        return False
    return True


def is_local() -> bool:
    """Whether the artifacts storage is a folder of this machine (not S3, say): a batch output
    is written uncompressed there (see ``tasks_app.data.results``)."""
    return isinstance(storage(), FileSystemStorage)


@contextmanager
def reading(name: str) -> Iterator[IO[bytes]]:
    with storage().open(name, "rb") as handle:
        yield handle


def delete_tree(prefix: str) -> int:
    """Delete every file under ``prefix`` (Storage has no recursive delete); return how many."""
    store = storage()
    try:
        dirs, files = store.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    deleted = 0
    for name in files:
        store.delete(f"{prefix}/{name}")
        deleted += 1
    for sub in dirs:
        deleted += delete_tree(f"{prefix}/{sub}")
    return deleted


class QuotaExceeded(PermanentError):
    """The owner's artifacts would pass ``QW_ARTIFACT_QUOTA_BYTES``: a retry cannot fix it."""

    def __init__(self, quota: int) -> None:
        super().__init__(f"artifact quota of {quota} bytes exceeded for this owner")


def owner_bytes(owner_id: Any) -> int:
    """The bytes of the owner's stored artifacts."""
    total = Artifact.objects.filter(owner_id=owner_id).aggregate(total=Sum("size_bytes"))["total"]
    return int(total or 0)


def quota_room(owner_id: Any) -> int | None:
    """The bytes the owner may still store (``None``: no quota); below 0 when already over."""
    quota = settings.QW_ARTIFACT_QUOTA_BYTES
    return quota - owner_bytes(owner_id) if quota else None


def _lock_owner(owner_id: Any) -> None:
    """Serialise the quota check and insert of one owner's artifacts (until the commit)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"artifact-quota:{owner_id}"]
        )


def artifact_create(
    *, task: Task, fmt: str, file: IO[bytes], rows: int, label: str = "rows"
) -> Artifact:
    """Store the whole of ``file`` (``rows`` rows in ``fmt``) as an output of ``task``.

    Raises ``QuotaExceeded`` (nothing stored) when it would pass the owner's quota.
    """
    size = file.seek(0, 2)
    artifact = Artifact(owner_id=task.owner_id, task=task, format=fmt, rows=rows, size_bytes=size)
    artifact.name = f"results/{task.id}/{label}-{artifact.id}.{fmt}"
    artifact.content_type = CONTENT_TYPES.get(fmt, "application/octet-stream")
    artifact.expires_at = timezone.now() + timedelta(days=settings.QW_ARTIFACT_TTL_DAYS)
    with transaction.atomic():
        _lock_owner(task.owner_id)
        room = quota_room(task.owner_id)
        if room is not None and size > room:
            raise QuotaExceeded(settings.QW_ARTIFACT_QUOTA_BYTES)
        artifact.save(force_insert=True)  # the row reserves its bytes before the file exists
    try:
        name, artifact.size_bytes = save(artifact.name, file)
    except BaseException:
        artifact.delete()
        raise
    if name != artifact.name:
        artifact.name = name
        Artifact.objects.filter(pk=artifact.pk).update(name=name)
    return artifact


def artifact_delete(artifact: Artifact) -> None:
    """Delete an artifact's file and row."""
    storage().delete(artifact.name)
    artifact.delete()


def describe(artifact: Artifact) -> dict[str, Any]:
    """How a task's result refers to an artifact."""
    return {
        "id": str(artifact.id),
        "format": artifact.format,
        "content_type": artifact.content_type,
        "rows": artifact.rows,
        "size_bytes": artifact.size_bytes,
        "expires_at": artifact.expires_at.isoformat().replace("+00:00", "Z"),
    }


def expire(*, now: datetime | None = None) -> int:
    """Delete artifacts past their expiry, and work files of finished tasks; return the count.

    A task's result keeps its artifact reference: the result endpoint answers 410 once the
    artifact is gone.
    """
    now = now or timezone.now()
    expired = list(
        Artifact.objects.filter(expires_at__lt=now).order_by("expires_at")[:EXPIRE_BATCH]
    )
    store = storage()
    for artifact in expired:
        try:
            store.delete(artifact.name)
        except OSError:
            logger.warning("could not delete artifact file %s", artifact.name, exc_info=True)
            continue
        artifact.delete()
    # A COMPLETED task's work is done with (one that completed in its own attempt leaves it
    # here). An hour's grace for the others: one retried by hand finds its batches again.
    leftovers = list(
        DataJob.objects.filter(
            Q(task__status=TaskStatus.COMPLETED)
            | Q(task__status__in=TERMINAL_STATUSES, task__finished_at__lt=now - WORK_GRACE)
        ).values_list("task_id", flat=True)[:EXPIRE_BATCH]
    )
    for task_id in leftovers:
        delete_tree(work_prefix(task_id))
    DataJob.objects.filter(task_id__in=leftovers).delete()
    if expired:
        logger.info("expired %d artifacts", len(expired))
    return len(expired)
