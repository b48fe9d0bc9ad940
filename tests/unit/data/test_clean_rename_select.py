"""``clean``, ``rename`` and ``select``."""

from __future__ import annotations

import pytest

from tasks_app.data import DataError
from tests.unit.data._support import rows_of, run


def test_clean_trims_then_empties_then_cases() -> None:
    records = [{"e": "  A@X.de\t", "n": " ", "k": 1}, {"e": "b@y", "n": "x ", "k": 2}]
    op = {"op": "clean", "trim": True, "lower": ["e"], "empty_as_null": True}

    assert rows_of(run([op], records).frame) == [
        {"e": "a@x.de", "n": None, "k": 1},
        {"e": "b@y", "n": "x", "k": 2},
    ]


def test_clean_without_trim_keeps_white_space() -> None:
    op = {"op": "clean", "empty_as_null": True}

    assert rows_of(run([op], [{"s": " "}, {"s": ""}]).frame) == [{"s": " "}, {"s": None}]


def test_clean_upper_uses_full_unicode_case_mapping() -> None:
    records = [{"s": "Straße"}, {"s": "ǆemal"}, {"s": "👍🏽 ok"}, {"s": "e\u0301"}]

    result = run([{"op": "clean", "upper": ["s"]}], records)

    assert [r["s"] for r in rows_of(result.frame)] == ["STRASSE", "ǄEMAL", "👍🏽 OK", "E\u0301"]


def test_clean_does_not_normalise_unicode() -> None:
    records = [{"s": "\u00e9"}, {"s": "e\u0301"}]
    ops = [{"op": "clean", "lower": ["s"]}, {"op": "dedupe", "keys": ["s"]}]

    assert run(ops, records).frame.height == 2


def test_clean_drop_null_drops_nulls_and_missing_keys_without_calling_them_invalid() -> None:
    records = [{"e": "a", "k": 1}, {"e": None, "k": 2}, {"k": 3}, {"e": "", "k": 4}]
    op = {"op": "clean", "empty_as_null": True, "drop_null": ["e"]}

    result = run([op], records)

    assert rows_of(result.frame) == [{"e": "a", "k": 1}]
    assert result.stats["invalid"] == 0
    assert result.stats["operations"][0] == {
        "op": "clean",
        "rows_in": 4,
        "rows_out": 1,
        "dropped_null": 3,
    }


def test_clean_drop_null_on_a_field_no_row_has_drops_everything() -> None:
    assert run([{"op": "clean", "drop_null": ["ghost"]}], [{"a": 1}]).frame.height == 0


def test_clean_lower_of_a_number_field_fails() -> None:
    with pytest.raises(DataError, match=r"operations\[0\]\.lower: field 'n' is a number"):
        run([{"op": "clean", "lower": ["n"]}], [{"n": 1}])


def test_clean_lower_of_missing_or_null_field_is_a_no_op() -> None:
    ops = [{"op": "clean", "lower": ["ghost", "nothing"]}]

    assert rows_of(run(ops, [{"nothing": None}]).frame) == [{"nothing": None}]


def test_clean_leaves_non_text_columns_alone() -> None:
    op = {"op": "clean", "trim": True, "empty_as_null": True}

    assert rows_of(run([op], [{"n": 1, "b": False}]).frame) == [{"n": 1, "b": False}]


def test_rename_moves_fields_and_missing_ones_are_a_no_op() -> None:
    result = run([{"op": "rename", "fields": {"a": "x", "ghost": "y"}}], [{"a": 1, "b": 2}])

    assert rows_of(result.frame) == [{"x": 1, "b": 2}]


def test_rename_onto_an_existing_field_replaces_it() -> None:
    result = run([{"op": "rename", "fields": {"a": "b"}}], [{"a": 1, "b": 2}])

    assert rows_of(result.frame) == [{"b": 1}]


def test_rename_swaps_at_once() -> None:
    result = run([{"op": "rename", "fields": {"a": "b", "b": "a"}}], [{"a": 1, "b": 2}])

    assert rows_of(result.frame) == [{"b": 1, "a": 2}]


def test_rename_keeps_knowing_which_keys_were_missing() -> None:
    ops = [
        {"op": "rename", "fields": {"a": "z"}},
        {"op": "validate", "schema": {"required": ["z"]}},
    ]

    result = run(ops, [{"a": None}, {"b": 1}])

    assert result.stats["invalid"] == 1
    assert result.invalid_samples[0]["row"] == 1


def test_select_orders_fields_and_adds_null_columns() -> None:
    result = run([{"op": "select", "fields": ["c", "a", "ghost"]}], [{"a": 1, "b": 2, "c": 3}])

    assert result.frame.columns == ["c", "a", "ghost"]
    assert rows_of(result.frame) == [{"c": 3, "a": 1, "ghost": None}]


def test_select_field_no_row_has_is_still_missing_for_validate() -> None:
    ops = [
        {"op": "select", "fields": ["ghost"]},
        {"op": "validate", "schema": {"required": ["ghost"]}},
    ]

    assert run(ops, [{"a": 1}]).stats["invalid"] == 1


def test_select_on_empty_input_gives_the_columns() -> None:
    result = run([{"op": "select", "fields": ["a", "b"]}], [])

    assert result.frame.shape == (0, 2)
