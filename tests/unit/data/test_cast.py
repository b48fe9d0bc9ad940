"""``cast``: explicit conversions; what does not convert makes the row invalid."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tasks_app.data import DataError, to_records
from tests.unit.data._support import run


def _cast(values: list[Any], target: str, on_invalid: str = "drop") -> Any:
    op = {"op": "cast", "fields": {"v": target}, "on_invalid": on_invalid}
    return run([op], [{"v": value} for value in values])


def _kept(values: list[Any], target: str) -> list[Any]:
    return _cast(values, target).frame.get_column("v").to_list()


def test_cast_text_to_int_accepts_sign_and_surrounding_space() -> None:
    assert _kept(["42", " 42 ", "+7", "-0", "007", None], "int") == [42, 42, 7, 0, 7, None]


@pytest.mark.parametrize("bad", ["1.5", "1e3", "4_2", "x", "٤٢", "99999999999999999999"])
def test_cast_text_to_int_rejects_anything_else(bad: str) -> None:
    result = _cast([bad], "int")

    assert result.frame.height == 0
    assert result.stats["invalid"] == 1
    assert result.invalid_samples[0]["reason"] == f"v: cannot cast {bad!r} to int"


def test_cast_empty_text_is_null_not_invalid() -> None:
    result = _cast(["", "  ", "3"], "int")

    assert result.frame.get_column("v").to_list() == [None, None, 3]
    assert result.stats["invalid"] == 0


def test_cast_text_to_float_rejects_nan_and_infinity() -> None:
    result = _cast(["1.5", "-.5", "1e3", "nan", "inf", "1e999"], "float")

    assert result.frame.get_column("v").to_list() == [1.5, -0.5, 1000.0]
    assert result.stats["invalid"] == 3


def test_cast_text_to_bool_knows_common_spellings() -> None:
    values = ["true", "FALSE", "1", "0", "Yes", "no", "maybe"]

    assert _kept(values, "bool") == [True, False, True, False, True, False]


def test_cast_text_to_date_needs_an_existing_iso_day() -> None:
    result = _cast(["2024-02-29", "2023-02-29", "2024-2-1", "01/02/2024"], "date")

    assert result.frame.get_column("v").to_list() == [dt.date(2024, 2, 29)]
    assert result.stats["invalid"] == 3


def test_cast_text_to_datetime_converts_offsets_to_utc() -> None:
    values = [
        "2024-01-02T03:04:05Z",
        "2024-01-02 03:04",
        "2024-01-02T03:04:05.123456+02:00",
        "2024-01-02T03:04:05-0130",
        "2024-01-02",
        "2024-01-02T25:00",
    ]

    result = _cast(values, "datetime")

    assert [r["v"] for r in to_records(result.frame)] == [
        "2024-01-02T03:04:05+00:00",
        "2024-01-02T03:04:00+00:00",
        "2024-01-02T01:04:05.123456+00:00",
        "2024-01-02T04:34:05+00:00",
        "2024-01-02T00:00:00+00:00",
    ]
    assert result.stats["invalid"] == 1


def test_cast_float_to_int_never_truncates() -> None:
    result = _cast([1.0, 1.5, -3.0, None], "int")

    assert result.frame.get_column("v").to_list() == [1, -3, None]
    assert result.invalid_samples[0]["reason"] == "v: cannot cast 1.5 to int"


def test_cast_numbers_and_bools_between_each_other() -> None:
    assert _kept([0, 1, 2], "bool") == [False, True]
    assert _kept([True, False], "int") == [1, 0]
    assert _kept([1, 2], "float") == [1.0, 2.0]
    assert _kept([1.5, 2.0], "str") == ["1.5", "2.0"]
    assert _kept([True], "str") == ["true"]


def test_cast_nested_values_to_str_gives_json_text() -> None:
    assert _kept([{"a": 1}, None], "str") == ['{"a":1}', None]
    assert _kept([[1, 2]], "str") == ["[1,2]"]


def test_cast_number_to_date_is_invalid() -> None:
    assert _cast([20240101], "date").stats["invalid"] == 1


def test_cast_date_to_datetime_and_back() -> None:
    ops = [
        {"op": "cast", "fields": {"v": "date"}},
        {"op": "cast", "fields": {"v": "datetime"}},
        {"op": "cast", "fields": {"v": "str"}},
    ]

    assert to_records(run(ops, [{"v": "2024-03-01"}]).frame) == [{"v": "2024-03-01T00:00:00+00:00"}]


def test_cast_null_column_takes_the_type() -> None:
    result = _cast([None, None], "int")

    assert str(result.frame.schema["v"]) == "Int64"
    assert result.stats["invalid"] == 0


def test_cast_missing_field_is_a_no_op() -> None:
    result = run([{"op": "cast", "fields": {"ghost": "int"}}], [{"a": "1"}])

    assert result.frame.columns == ["a"]


def test_cast_several_fields_names_the_first_that_failed() -> None:
    op = {"op": "cast", "fields": {"a": "int", "b": "int"}}

    result = run([op], [{"a": "1", "b": "x"}, {"a": "y", "b": "z"}])

    assert [s["reason"] for s in result.invalid_samples] == [
        "b: cannot cast 'x' to int",
        "a: cannot cast 'y' to int",
    ]


def test_cast_fail_mode_raises_on_the_first_bad_row() -> None:
    with pytest.raises(DataError, match=r"operations\[0\] \(cast\): row 1 is invalid"):
        _cast(["1", "x"], "int", on_invalid="fail")


def test_cast_collect_mode_keeps_the_row_as_it_was() -> None:
    result = _cast(["1", "x"], "int", on_invalid="collect")

    assert result.as_result()["invalid_rows"] == [
        {"row": 1, "operation": "operations[0]", "record": {"v": "x"}}
    ]
