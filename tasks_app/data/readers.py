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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

import ijson
import polars as pl

from tasks_app.data.core import DataError, check_field_names

CHUNK_BYTES = 4 * 1024 * 1024  # read size: 8 MiB measured 30 MB more peak RSS, no faster
# A batch's byte range up to this is parsed in one piece (see ``read_csv_range``).
WHOLE_RANGE_BYTES = 32 * 1024 * 1024
# A record longer than this without a closing quote is taken for a broken file.
MAX_RECORD_BYTES = 64 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_BLANK_AT_START = re.compile(rb"(?:(?<=\n)|^)\r?\n")
_BLANK = re.compile(rb"(?<=\n)\r?\n")
_MAYBE_BLANK = re.compile(rb"\n\r?\n")  # searched faster than ``in`` finds b"\n\n"
_NEWLINES_ONLY = re.compile(rb"[\r\n]*")
_NOT_MARKS = bytes(byte for byte in range(256) if byte not in b'"\n')  # ``translate`` drops


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
    if _MAYBE_BLANK.search(chunk) is None and not chunk.startswith((b"\n", b"\r\n")):
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


def _frames(
    stream: IO[bytes], batch_size: int, chunk_bytes: int, first_row: int = 0
) -> Iterator[pl.DataFrame]:
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
        frame = _parse(piece, header, header_line, first_row + rows)
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


# --- byte ranges: each batch parses its own part of a CSV file --------------------------------

SCAN_BYTES = 256 * 1024  # the scan's block: only a block holding a cut is walked line by line


@dataclass(frozen=True)
class CsvRange:
    """Records ``first_row`` … ``first_row + rows - 1`` of a CSV file: bytes ``start``–``end``."""

    start: int
    end: int
    first_row: int
    rows: int


@dataclass(frozen=True)
class CsvLayout:
    """Where a CSV file's header and records are, cut into ranges of ``batch_size`` records.

    ``header``: bytes ``header_start``–``header_end`` (past a BOM and leading blank lines).
    """

    header_start: int
    header_end: int
    rows: int
    batch_size: int
    ranges: list[CsvRange]


@dataclass(frozen=True)
class _Block:
    start: int
    end: int
    odd: bool  # inside a quoted field at ``start``
    records: int  # records that end in the block (blank lines are none)


def _blank_records(outside: bytes, at_record_start: bool) -> int:
    return len((_BLANK_AT_START if at_record_start else _BLANK).findall(outside))


def _block_records(block: bytes, odd: bool) -> tuple[int, bool]:
    """Records that end in ``block`` (which starts at a line start, inside quotes when ``odd``)
    and whether it ends inside quotes: the rule of ``_record_end``, a newline ends a record
    when the quotes before it since the last record end are even.

    A few passes over the bytes at C speed (a block without blank lines, the usual case, is
    told by one regular-expression search; quoted text only by a split on its quotes). Without
    blank lines only where the quotes and newlines are matters: the split and the counts then
    go over those alone (one ``translate``), not over many small pieces of the block (on a
    CSV of 104 MB whose last field is often quoted: 190 ms of CPU against 110).
    """
    blanks = _MAYBE_BLANK.search(block) is not None or block.startswith((b"\n", b"\r\n"))
    if not blanks:
        block = block.translate(None, _NOT_MARKS)
    newlines = block.count(b"\n")
    if b'"' not in block:
        if odd:
            return 0, True
        return newlines - (_blank_records(block, True) if blanks else 0), False
    parts = block.split(b'"')
    inside = b"".join(parts[0 if odd else 1 :: 2])
    ends = newlines - inside.count(b"\n")
    if blanks:
        ends -= _blank_records(b'"'.join(parts[1 if odd else 0 :: 2]), not odd)
    return ends, odd != ((len(parts) - 1) % 2 == 1)


def _record_ends(block: bytes, odd: bool) -> Iterator[int]:
    """The offset just past each non-blank record that ends in ``block`` (see
    ``_block_records``), one line at a time."""
    position = 0
    record_start = 0 if not odd else -1
    while True:
        newline = block.find(b"\n", position)
        if newline < 0:
            return
        if block.count(b'"', position, newline) % 2:
            odd = not odd
        if not odd:
            if record_start < 0 or block[record_start:newline] not in (b"", b"\r"):
                yield newline + 1
            record_start = newline + 1
        position = newline + 1


def _read_at(stream: IO[bytes], start: int, size: int) -> bytes:
    stream.seek(start)
    data = stream.read(size)
    if not isinstance(data, bytes):
        raise TypeError("a CSV source must be a binary file")
    return data


def csv_layout(
    stream: IO[bytes], batch_size: int, *, size_for: Any = None, scan_bytes: int = SCAN_BYTES
) -> CsvLayout | None:
    """Cut a seekable CSV file into ranges of ``batch_size`` records without parsing it.

    The records are the ones ``iter_csv_frames`` reads (a newline outside quotes ends one;
    blank lines are none), so that ``read_csv_range`` over each range gives the same frames
    as ``iter_csv_frames(stream, batch_size)``. ``size_for(rows)``, when given, may raise the
    batch size once the records are counted. None when the file is better read whole, in
    order: no header, a header longer than a block, or a quote left open at the end (its
    error is the serial reader's to give).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    head = _read_at(stream, 0, scan_bytes)
    offset = len(_BOM) if head.startswith(_BOM) else 0
    while True:  # leading blank lines
        if head.startswith(b"\n", offset):
            offset += 1
        elif head.startswith(b"\r\n", offset):
            offset += 2
        else:
            break
    if offset >= len(head):
        return None
    header_end = offset + _first_record_end(head[offset:])
    if header_end > len(head) or not head[header_end - 1 : header_end] == b"\n":
        return None  # a header alone, without its newline, or longer than a block
    _parse_header(head[offset:header_end])  # a bad header fails here, as it would serially
    blocks: list[_Block] = []
    position, odd, tail = header_end, False, b""
    while True:
        data = _read_at(stream, position, scan_bytes)
        while b"\n" not in data and len(data) < MAX_RECORD_BYTES:  # a line longer than a block
            more = _read_at(stream, position + len(data), len(data))
            if not more:
                break
            data += more
        if not data:
            break
        cut = data.rfind(b"\n") + 1
        if not cut:  # the last bytes, after the last newline (or a line past every limit)
            if len(data) >= MAX_RECORD_BYTES:
                return None
            tail = data
            break
        block = data[:cut]
        records, ends_odd = _block_records(block, odd)
        blocks.append(_Block(position, position + len(block), odd, records))
        position, odd = position + len(block), ends_odd
    if odd:
        return None
    rows = sum(block.records for block in blocks)
    if tail.strip():
        rows += 1
    size = size_for(rows) if size_for is not None else batch_size
    return CsvLayout(
        offset, header_end, rows, size, _ranges(stream, blocks, header_end, rows, size)
    )


def _ranges(
    stream: IO[bytes], blocks: list[_Block], data_start: int, rows: int, size: int
) -> list[CsvRange]:
    """Ranges of ``size`` records (the last one: the rest, up to the end of the file)."""
    cuts: list[int] = []  # the byte offset that ends each full range but the last
    wanted = size
    seen = 0
    for block in blocks:
        if wanted >= rows:
            break
        if seen + block.records < wanted:
            seen += block.records
            continue
        data = _read_at(stream, block.start, block.end - block.start)
        for end in _record_ends(data, block.odd):
            seen += 1
            if seen == wanted:
                cuts.append(block.start + end)
                wanted += size
                if wanted >= rows:
                    break
    ranges = []
    start = data_start
    for index, end in enumerate([*cuts, stream.seek(0, 2)]):
        first = index * size
        ranges.append(CsvRange(start, end, first, min(size, rows - first)))
        start = end
    return ranges


class _RangeReader(io.RawIOBase):
    """``head``, then bytes ``start``–``end`` of ``stream``."""

    def __init__(self, head: bytes, stream: IO[bytes], start: int, end: int) -> None:
        self._head = head
        self._stream = stream
        self._left = end - start
        stream.seek(start)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head:
            take = len(self._head) if size < 0 else size
            data, self._head = self._head[:take], self._head[take:]
            if size < 0:
                data += self.read()
            return data
        if self._left <= 0:
            return b""
        data = self._stream.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_csv_range(
    stream: IO[bytes], header_start: int, header_end: int, start: int, end: int, first_row: int = 0
) -> pl.DataFrame:
    """The records of bytes ``start``–``end`` (a range of ``csv_layout``) as one frame, read
    behind the file's header as ``iter_csv_frames`` reads them.

    A range up to ``WHOLE_RANGE_BYTES`` is read and parsed in one piece: ``csv_layout`` cut it
    at record ends, so it needs no search for them, and one parse of it costs half of the
    parses of its ``CHUNK_BYTES`` pieces, their concatenation and the rechunk (measured on a
    batch of 100,000 rows, 10 MB: 62 ms of CPU against 35). A larger one is streamed.
    """
    header = _read_at(stream, header_start, header_end - header_start)
    if end - start <= WHOLE_RANGE_BYTES:
        return _whole_range(header, _read_at(stream, start, end - start), first_row)
    reader = _RangeReader(header, stream, start, end)
    frames = list(_frames(cast(IO[bytes], reader), 1 << 62, CHUNK_BYTES, first_row))
    return frames[0] if frames else pl.DataFrame()


def _whole_range(header_line: bytes, body: bytes, first_row: int) -> pl.DataFrame:
    """``_frames`` over ``header_line`` + ``body`` in one piece: ``body`` starts at a record
    start and holds whole records, but for the file's last bytes after its last newline (kept
    unless they are white space, as ``_pieces`` keeps them)."""
    header = _parse_header(header_line)
    if not header:
        return pl.DataFrame()
    tail = len(body) - body.rfind(b"\n") - 1
    if tail and not body[-tail:].strip():
        body = body[:-tail]
    body = _drop_blank_lines(body)
    if _NEWLINES_ONLY.fullmatch(body):  # not ``strip``: that copies the whole range
        return pl.DataFrame(schema=dict.fromkeys(header, pl.String()))
    return _parse(body, header, header_line, first_row).rechunk()  # the operations run faster
