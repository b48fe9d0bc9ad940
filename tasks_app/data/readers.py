"""Streaming readers: a source is read in pieces, never whole, whatever its size.

CSV is cut into byte chunks at record boundaries (a newline outside quotes: the count of quote
characters before it is even) and each chunk is parsed by Polars' reader with every column as
a string, so memory stays at about one chunk plus one batch. JSON arrays go through ijson;
JSON Lines through the file's own lines.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Literal

import ijson
import polars as pl

from tasks_app.data.core import DataError, check_field_names

CHUNK_BYTES = 4 * 1024 * 1024  # read size: 8 MiB measured 30 MB more peak RSS, no faster
# A record longer than this without a closing quote is taken for a broken file.
MAX_RECORD_BYTES = 64 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_BLANK_AT_START = re.compile(rb"(?:(?<=\n)|^)\r?\n")
_BLANK = re.compile(rb"(?<=\n)\r?\n")


def _record_end(buffer: bytes, start: int) -> int:
    """The index just past the last complete record in ``buffer`` (0: none is complete).

    ``buffer`` starts at a record boundary; only newlines from ``start`` on are candidates.
    """
    end = buffer.rfind(b"\n", start)
    if end < 0:
        return 0
    quotes = buffer.count(b'"', 0, end)
    while quotes % 2:
        previous = buffer.rfind(b"\n", start, end)
        if previous < 0:
            return 0
        quotes -= buffer.count(b'"', previous, end)
        end = previous
    return end + 1


def _first_record_end(buffer: bytes) -> int:
    quotes = 0
    position = 0
    while True:
        newline = buffer.find(b"\n", position)
        if newline < 0:
            return len(buffer)
        quotes += buffer.count(b'"', position, newline)
        if quotes % 2 == 0:
            return newline + 1
        position = newline + 1


def _drop_blank_lines(chunk: bytes) -> bytes:
    """Remove empty lines outside quoted fields (as Python's csv module skips them)."""
    if b"\n\n" not in chunk and b"\n\r\n" not in chunk and not chunk.startswith((b"\n", b"\r\n")):
        return chunk
    parts = chunk.split(b'"')
    for index in range(0, len(parts), 2):
        parts[index] = (_BLANK_AT_START if index == 0 else _BLANK).sub(b"", parts[index])
    return b'"'.join(parts)


def _pieces(stream: IO[bytes], chunk_bytes: int) -> Iterator[bytes]:
    """Yield the stream in pieces of whole records."""
    pending = stream.read(len(_BOM))
    if not isinstance(pending, bytes):
        raise TypeError("a CSV source must be a binary file")
    pending = pending.removeprefix(_BOM)
    while True:
        data = stream.read(chunk_bytes)
        buffer = pending + data
        if not data:
            if buffer.strip():
                yield buffer
            return
        end = _record_end(buffer, len(pending))
        if end:
            yield buffer[:end]
        pending = buffer[end:]
        if len(pending) > MAX_RECORD_BYTES:
            raise DataError("CSV: a record longer than 64 MiB, or an unbalanced quote")


def _parse_header(chunk: bytes) -> list[str]:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"CSV header is not valid UTF-8: {exc}") from exc
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    if not rows:
        return []
    header = rows[0]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(f"CSV header: duplicate column {name!r}")
        seen.add(name)
    check_field_names(header, "CSV header")
    return header


def _parse(chunk: bytes, header: list[str], header_line: bytes, first_row: int) -> pl.DataFrame:
    """Parse whole records, behind the file's own header line.

    With the header in front, Polars counts the columns on it, not on the chunk's first row, so a
    short row reads the same wherever a chunk starts.
    """
    try:
        return pl.read_csv(
            header_line + chunk,
            has_header=True,
            schema=dict.fromkeys(header, pl.String()),
            infer_schema=False,
            empty_string_is_null=False,
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError as exc:
        message = str(exc).splitlines()[0]
        if "more fields" in message:
            message = "a row has more fields than the header"
        raise DataError(f"CSV, in the rows from {first_row}: {message}") from exc


def iter_csv_frames(
    source: IO[bytes] | str | Path, batch_size: int, *, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pl.DataFrame]:
    """Frames of up to ``batch_size`` rows, every field a string exactly as in the file.

    An empty field is ``""``; a row with fewer fields than the header gets ``""`` for the
    missing ones (Polars' reading), one with more is a ``DataError``; blank lines are skipped.
    An empty file gives nothing; a header alone gives one frame with no rows.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    with ExitStack() as stack:
        stream: IO[bytes]
        if isinstance(source, str | Path):
            stream = stack.enter_context(open(source, "rb"))
        else:
            stream = source
        yield from _frames(stream, batch_size, chunk_bytes)


def _frames(stream: IO[bytes], batch_size: int, chunk_bytes: int) -> Iterator[pl.DataFrame]:
    pieces = _pieces(stream, chunk_bytes)
    header: list[str] = []
    header_line = rest = b""
    for piece in pieces:
        piece = _drop_blank_lines(piece)
        if piece.strip(b"\r\n"):
            cut = _first_record_end(piece)
            header_line, rest = piece[:cut], piece[cut:]
            header = _parse_header(header_line)
            header_line = header_line if header_line.endswith(b"\n") else header_line + b"\n"
            break
    if not header:
        return
    pending: list[pl.DataFrame] = []
    held = rows = 0
    emitted = False
    for piece in itertools.chain([rest], pieces):
        piece = _drop_blank_lines(piece)
        if not piece.strip(b"\r\n"):
            continue
        frame = _parse(piece, header, header_line, rows)
        rows += frame.height
        pending.append(frame)
        held += frame.height
        while held >= batch_size:
            merged = pl.concat(pending, rechunk=False) if len(pending) > 1 else pending[0]
            yield merged.slice(0, batch_size).rechunk()
            emitted = True
            remainder = merged.slice(batch_size)
            pending, held = ([remainder], remainder.height) if remainder.height else ([], 0)
    if pending:
        yield pl.concat(pending).rechunk()
    elif not emitted:
        yield pl.DataFrame(schema=dict.fromkeys(header, pl.String()))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in strict JSON")


def iter_json_records(
    stream: IO[bytes], fmt: Literal["json", "jsonl"] = "json"
) -> Iterator[dict[str, Any]]:
    """Records of a JSON array of objects (streamed with ijson) or of JSON Lines.

    Blank lines of JSON Lines are skipped; numbers keep their JSON kind (int or float).
    """
    if fmt == "jsonl":
        yield from _jsonl(stream)
    elif fmt == "json":
        yield from _json_array(stream)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _jsonl(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"JSON Lines, line {number}: not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise DataError(
                f"JSON Lines, line {number}: a record must be an object, "
                f"not {type(record).__name__}"
            )
        yield record


def _json_array(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    head = stream.read(1)
    while head and head in b" \t\r\n\xef\xbb\xbf":
        head = stream.read(1)
    if head != b"[":
        raise DataError("JSON: the document must be an array of objects")
    rest = _Prefixed(head, stream)
    index = 0
    try:
        for record in ijson.items(rest, "item", use_float=True):
            if not isinstance(record, dict):
                raise DataError(
                    f"JSON: item {index} must be an object, not {type(record).__name__}"
                )
            yield record
            index += 1
    except ijson.JSONError as exc:
        message = str(exc).splitlines()[0]
        raise DataError(f"JSON: not valid JSON after item {index}: {message}") from exc


class _Prefixed(io.RawIOBase):
    """A binary stream that gives back the bytes already read before the rest."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head and size != 0:
            head, self._head = self._head, b""
            return head
        return self._stream.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
