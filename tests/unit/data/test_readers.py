"""Streaming readers: CSV in record-aligned chunks, JSON arrays with ijson, JSON Lines."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tasks_app.data import DataError, iter_csv_frames, iter_json_records, readers


def _csv(data: bytes, batch_size: int = 100, chunk_bytes: int = 4096) -> list[list[tuple]]:
    frames = iter_csv_frames(io.BytesIO(data), batch_size, chunk_bytes=chunk_bytes)
    return [frame.rows() for frame in frames]


def test_csv_fields_are_strings_exactly_as_written() -> None:
    frames = list(iter_csv_frames(io.BytesIO(b'id,age,note\n1, 42 ,\n007,x,"a,b"\n'), 10))

    assert frames[0].columns == ["id", "age", "note"]
    assert all(dtype == frames[0].schema["id"] for dtype in frames[0].schema.values())
    assert frames[0].rows() == [("1", " 42 ", ""), ("007", "x", "a,b")]


def test_csv_batches_have_batch_size_rows() -> None:
    data = b"n\n" + b"".join(f"{i}\n".encode() for i in range(10))

    sizes = [len(rows) for rows in _csv(data, batch_size=4, chunk_bytes=7)]

    assert sizes == [4, 4, 2]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 8, 64])
def test_csv_quoted_newlines_survive_any_chunking(chunk_bytes: int) -> None:
    data = b'a,b\n"x\n\ny",1\r\n"q""r",""\n3,"\n"\n'

    rows = [row for batch in _csv(data, batch_size=2, chunk_bytes=chunk_bytes) for row in batch]

    assert rows == [("x\n\ny", "1"), ('q"r', ""), ("3", "\n")]


def test_csv_bom_and_blank_lines_are_skipped() -> None:
    data = b"\xef\xbb\xbf\n\na,b\r\n\r\n1,2\n\n\n3,4\n"

    assert _csv(data, chunk_bytes=3) == [[("1", "2"), ("3", "4")]]


def test_csv_short_row_reads_empty_fields() -> None:
    assert _csv(b"a,b,c\n1\n2,3,4\n", chunk_bytes=2) == [[("1", "", ""), ("2", "3", "4")]]


def test_csv_long_row_fails() -> None:
    with pytest.raises(DataError, match="more fields than the header"):
        _csv(b"a,b\n1,2\n1,2,3\n")


def test_csv_duplicate_header_fails() -> None:
    with pytest.raises(DataError, match="duplicate column 'a'"):
        _csv(b"a,b,a\n1,2,3\n")


def test_csv_reserved_header_fails() -> None:
    with pytest.raises(DataError, match="reserved"):
        _csv(b"__qw_row\n1\n")


def test_csv_invalid_utf8_fails() -> None:
    with pytest.raises(DataError, match="utf-8"):
        _csv(b"a,b\n\xff,1\n")


def test_csv_unicode_is_kept() -> None:
    data = "name\nStraße\n👍🏽\ne\u0301\n".encode()

    assert _csv(data, chunk_bytes=3) == [[("Straße",), ("👍🏽",), ("e\u0301",)]]


def test_csv_empty_file_gives_no_frames() -> None:
    assert _csv(b"") == []


def test_csv_header_only_gives_one_empty_frame() -> None:
    frames = list(iter_csv_frames(io.BytesIO(b"a,b\n"), 10))

    assert len(frames) == 1
    assert frames[0].columns == ["a", "b"]
    assert frames[0].height == 0


def test_csv_reads_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"a\n1\n2\n")

    assert [frame.rows() for frame in iter_csv_frames(path, 1)] == [[("1",)], [("2",)]]


def test_csv_text_file_fails() -> None:
    with pytest.raises(TypeError):
        list(iter_csv_frames(io.StringIO("a\n1\n"), 10))  # type: ignore[arg-type]


def test_json_array_streams_objects() -> None:
    data = b' [{"a": 1, "b": 1.5, "c": [true, null]}, {"d": "\\u00df"}]'

    assert list(iter_json_records(io.BytesIO(data), "json")) == [
        {"a": 1, "b": 1.5, "c": [True, None]},
        {"d": "ß"},
    ]


def test_json_empty_array_gives_nothing() -> None:
    assert list(iter_json_records(io.BytesIO(b"[]"), "json")) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1}', "must be an array of objects"),
        (b"", "must be an array of objects"),
        (b'[{"a": 1}, 2]', "item 1 must be an object, not int"),
        (b'[{"a": 1}, {"a": ', "not valid JSON after item 1"),
        (b'[{"a": NaN}]', "not valid JSON after item 0"),
    ],
)
def test_json_malformed_input_fails(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        list(iter_json_records(io.BytesIO(data), "json"))


def test_jsonl_reads_lines_and_skips_blank_ones() -> None:
    data = b'{"a": 1}\n\n  \n{"a": 2.0}\r\n'

    assert list(iter_json_records(io.BytesIO(data), "jsonl")) == [{"a": 1}, {"a": 2.0}]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1}\n{"a": \n', "line 2: not valid JSON"),
        (b'{"a": 1}\n\n[1]\n', "line 3: a record must be an object, not list"),
        (b'{"a": Infinity}\n', "line 1: not valid JSON: Infinity is not valid in strict JSON"),
        (b'{"a": 1}\n\xff\n', "line 2: not valid JSON"),
    ],
)
def test_jsonl_bad_line_fails_naming_it(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        list(iter_json_records(io.BytesIO(data), "jsonl"))


def test_csv_unbalanced_quote_fails_instead_of_reading_everything(monkeypatch) -> None:
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 64)
    data = b'a,b\n1,"never closed\n' + b"x,y\n" * 100

    with pytest.raises(DataError, match="unbalanced quote"):
        _csv(data, chunk_bytes=16)
