"""``filter``: typed comparisons, SQL-like nulls, nested all/any."""

from __future__ import annotations

from typing import Any

import pytest

from tasks_app.data import DataError
from tests.unit.data._support import rows_of, run

RECORDS = [
    {"id": 0, "age": 30, "name": "Ann", "tags": ["a", "b"], "ok": True, "score": 1},
    {"id": 1, "age": None, "name": "bob", "tags": [], "ok": False, "score": 2.5},
    {"id": 2, "name": "Straße", "tags": None},
    {"id": 3, "age": 17, "name": None, "tags": ["b"], "ok": None},
]


def _ids(where: dict[str, Any], records: list[dict[str, Any]] = RECORDS) -> list[int]:
    result = run([{"op": "filter", "where": where}], records)
    return [row["id"] for row in rows_of(result.frame)]


@pytest.mark.parametrize(
    ("where", "ids"),
    [
        ({"field": "age", "eq": 30}, [0]),
        ({"field": "age", "ne": 30}, [3]),
        ({"field": "age", "lt": 30}, [3]),
        ({"field": "age", "lte": 30}, [0, 3]),
        ({"field": "age", "gt": 17.5}, [0]),
        ({"field": "age", "gte": 17}, [0, 3]),
        ({"field": "age", "in": [17, 99]}, [3]),
        ({"field": "age", "in": [30.0, 2.5]}, [0]),
        ({"field": "score", "in": [1, 2.5]}, [0, 1]),
        ({"field": "age", "is_null": True}, [1, 2]),
        ({"field": "age", "is_null": False}, [0, 3]),
        ({"field": "name", "lt": "b"}, [0, 2]),
        ({"field": "name", "contains": "aß"}, [2]),
        ({"field": "tags", "contains": "b"}, [0, 3]),
        ({"field": "ok", "eq": False}, [1]),
        ({"field": "ok", "in": [True, False]}, [0, 1]),
        ({"field": "ghost", "eq": 1}, []),
        ({"field": "ghost", "is_null": True}, [0, 1, 2, 3]),
    ],
)
def test_filter_conditions_keep_matching_rows(where: dict[str, Any], ids: list[int]) -> None:
    assert _ids(where) == ids


def test_filter_ne_of_null_is_false() -> None:
    assert _ids({"field": "name", "ne": "Ann"}) == [1, 2]


def test_filter_all_and_any_nest() -> None:
    where = {
        "any": [
            {"all": [{"field": "age", "gte": 18}, {"field": "ok", "eq": True}]},
            {"field": "name", "eq": "Straße"},
        ]
    }

    assert _ids(where) == [0, 2]


def test_filter_empty_all_holds_and_empty_any_does_not() -> None:
    assert _ids({"all": []}) == [0, 1, 2, 3]
    assert _ids({"any": []}) == []


def test_filter_text_against_a_number_says_to_cast_first() -> None:
    where = {"all": [{"field": "id", "gte": 0}, {"field": "name", "gt": 5}]}

    with pytest.raises(DataError) as caught:
        _ids(where)

    message = str(caught.value)
    assert message.startswith("operations[0].where.all[1].gt: field 'name' holds text")
    assert "cast the field first" in message


def test_filter_number_against_text_fails() -> None:
    with pytest.raises(DataError, match=r"where\.eq: field 'age' is a number"):
        _ids({"field": "age", "eq": "30"})


def test_filter_booleans_have_no_order() -> None:
    with pytest.raises(DataError, match=r"operations\[0\]\.where\.lt: booleans have no order"):
        _ids({"field": "ok", "lt": True})


def test_filter_contains_on_a_number_fails() -> None:
    with pytest.raises(DataError, match="contains applies to text and lists"):
        _ids({"field": "age", "contains": 3})


def test_filter_dates_compare_with_iso_strings() -> None:
    ops = [
        {"op": "cast", "fields": {"d": "date", "t": "datetime"}},
        {
            "op": "filter",
            "where": {
                "all": [
                    {"field": "d", "gte": "2024-02-01"},
                    {"field": "t", "lt": "2024-03-01T12:00:00+02:00"},
                ]
            },
        },
    ]
    records = [
        {"d": "2024-01-31", "t": "2024-01-31T00:00"},
        {"d": "2024-02-01", "t": "2024-03-01T09:59"},
        {"d": "2024-03-01", "t": "2024-03-01T10:00"},
    ]

    assert [r["d"] for r in run(ops, records).as_result()["rows"]] == ["2024-02-01"]


def test_filter_bad_date_literal_fails() -> None:
    ops = [
        {"op": "cast", "fields": {"d": "date"}},
        {"op": "filter", "where": {"field": "d", "eq": "soon"}},
    ]

    with pytest.raises(DataError, match=r"operations\[1\]\.where\.eq: 'soon' is not an ISO"):
        run(ops, [{"d": "2024-01-01"}])


def test_filter_on_empty_input_keeps_nothing() -> None:
    assert _ids({"field": "age", "gt": 1}, []) == []


def test_filter_counts_rows_in_and_out_without_invalid() -> None:
    result = run([{"op": "filter", "where": {"field": "age", "gt": 18}}], RECORDS)

    assert result.stats["operations"] == [{"op": "filter", "rows_in": 4, "rows_out": 1}]
    assert result.stats["invalid"] == 0
