"""Column types of JSON records: decided over the whole input, shared by every batch."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tasks_app.data import DataError, Schema, SchemaBuilder, frame_from_records, infer_schema


def _types(records: list[dict]) -> dict[str, object]:
    return {f["name"]: f["type"] for f in infer_schema(records).to_json()["fields"]}


def test_infer_schema_scalar_kinds_map_to_polars_types() -> None:
    records = [{"i": 1, "f": 1.5, "b": True, "s": "x", "n": None}, {"i": 2, "f": 2, "b": None}]

    frame = frame_from_records(records)

    assert _types(records) == {"i": "int", "f": "float", "b": "bool", "s": "str", "n": "null"}
    assert frame.schema["i"] == pl.Int64
    assert frame.schema["f"] == pl.Float64
    assert frame.get_column("f").to_list() == [1.5, 2.0]
    assert frame.schema["b"] == pl.Boolean
    assert frame.schema["n"] == pl.Null


def test_infer_schema_mixed_kinds_become_their_text() -> None:
    records = [{"m": 1}, {"m": "a"}, {"m": True}, {"m": {"k": [1]}}, {"m": 1.5}, {"m": None}]

    frame = frame_from_records(records)

    assert _types(records) == {"m": "text"}
    assert frame.get_column("m").to_list() == ["1", "a", "true", '{"k":[1]}', "1.5", None]


def test_infer_schema_mixed_kinds_keep_each_values_kind() -> None:
    records = [{"m": 1}, {"m": "a"}, {"m": None}, {"m": [1]}, {}]

    schema = infer_schema(records)
    frame = frame_from_records(records, schema)

    assert schema.to_json()["fields"][0]["kinds"] == ["integer", "string", "array"]
    assert Schema.from_json(json.dumps(schema.to_json())) == schema
    assert frame.get_column("__qw_kind:m").to_list() == ["integer", "string", None, "array", None]


def test_frame_from_records_kind_outside_schema_fails() -> None:
    schema = infer_schema([{"m": 1}, {"m": "a"}])

    with pytest.raises(DataError, match="'m' holds other kinds"):
        frame_from_records([{"m": [1]}], schema)


def test_schema_without_kinds_still_reads_as_text() -> None:
    # As stored before kinds were recorded: the field is text, with no kind column.
    schema = Schema.from_json({"version": 1, "fields": [{"name": "m", "type": "text"}]})

    frame = frame_from_records([{"m": 1}, {"m": "a"}], schema)

    assert frame.columns == ["m"]
    assert frame.get_column("m").to_list() == ["1", "a"]


def test_infer_schema_bool_and_int_do_not_mix_into_numbers() -> None:
    assert _types([{"v": True}, {"v": 1}]) == {"v": "text"}


def test_infer_schema_integer_beyond_64_bits_is_float() -> None:
    records = [{"v": 2**70}, {"v": 1}]

    assert _types(records) == {"v": "float"}
    assert frame_from_records(records).get_column("v").to_list() == [float(2**70), 1.0]


def test_infer_schema_objects_and_arrays_keep_struct_and_list() -> None:
    records = [{"o": {"a": 1, "b": "x"}, "l": [1, 2]}, {"o": {"a": 2.5}, "l": []}]

    frame = frame_from_records(records)

    assert frame.schema["o"] == pl.Struct({"a": pl.Float64, "b": pl.String})
    assert frame.schema["l"] == pl.List(pl.Int64)
    assert frame.get_column("o").to_list() == [{"a": 1.0, "b": "x"}, {"a": 2.5, "b": None}]


def test_infer_schema_nested_mixed_values_become_text_inside() -> None:
    frame = frame_from_records([{"l": [1, "a", None]}, {"o": {"k": [1]}}, {"o": {"k": 2}}])

    assert frame.get_column("l").to_list() == [["1", "a", None], None, None]
    assert frame.get_column("o").to_list() == [None, {"k": "[1]"}, {"k": "2"}]


def test_infer_schema_empty_objects_are_text() -> None:
    assert frame_from_records([{"o": {}}]).get_column("o").to_list() == ["{}"]


def test_frame_from_records_remembers_missing_keys() -> None:
    frame = frame_from_records([{"a": 1, "b": None}, {"b": 2}])

    assert frame.get_column("a").to_list() == [1, None]
    assert frame.get_column("__qw_has:a").to_list() == [True, False]
    assert "__qw_has:b" not in frame.columns


def test_frame_from_records_empty_input_has_no_rows_and_no_columns() -> None:
    frame = frame_from_records([])

    assert frame.shape == (0, 0)


def test_schema_builder_merge_equals_one_pass_over_everything() -> None:
    records = [{"a": 1}, {"b": "x"}, {"a": 1.5, "c": [1]}, {"c": ["y"]}, {"a": None}]
    left, right = SchemaBuilder(), SchemaBuilder()
    for record in records[:2]:
        left.add(record)
    for record in records[2:]:
        right.add(record)

    merged = left.merge(right).schema()

    assert merged == infer_schema(records)
    assert [f.name for f in merged.fields] == ["a", "b", "c"]
    assert merged.to_json()["fields"][2]["type"] == {"list": "text"}


def test_schema_json_round_trip_is_equal() -> None:
    schema = infer_schema([{"a": 1, "o": {"x": [1.5]}, "m": [1, "a"]}, {"b": True}])

    text = json.dumps(schema.to_json())

    assert Schema.from_json(text) == schema
    assert Schema.from_json(json.loads(text)) == schema


def test_shared_schema_gives_every_batch_the_same_types() -> None:
    records = [{"v": 1}, {"v": 2}, {"v": 2.5}, {"v": None, "w": "x"}]
    schema = infer_schema(records)

    first = frame_from_records(records[:2], schema)
    second = frame_from_records(records[2:], schema)

    assert first.schema == second.schema
    assert first.get_column("w").to_list() == [None, None]
    assert first.get_column("__qw_has:w").to_list() == [False, False]
    assert pl.concat([first, second]).get_column("v").to_list() == [1.0, 2.0, 2.5, None]


def test_frame_from_records_key_outside_schema_fails() -> None:
    schema = infer_schema([{"a": 1}])

    with pytest.raises(DataError, match="'b' is not in the schema"):
        frame_from_records([{"a": 1, "b": 2}], schema)


def test_frame_from_records_reserved_field_name_fails() -> None:
    with pytest.raises(DataError, match="reserved"):
        frame_from_records([{"__qw_row": 1}])


def test_frame_from_records_non_object_row_fails() -> None:
    with pytest.raises(DataError, match="row 1 is not a JSON object"):
        frame_from_records([{"a": 1}, [1]], infer_schema([{"a": 1}]))  # type: ignore[list-item]
