"""``$ref`` resolution stays bounded in work and size, whatever the expression makes."""

from __future__ import annotations

import time

import pytest

from workflows_app.refs import RefError, json_size, resolve

CTX = {"input": {"x": [1], "s": "ab", "n": 5, "big": "é" * 40_000}, "steps": {}}


def doubling(stages: int, stage: str = " | [@,@][]") -> dict[str, str]:
    return {"$ref": "input.x" + stage * stages}


@pytest.fixture(autouse=True)
def limit(settings):
    settings.QW_MAX_PAYLOAD_BYTES = 64 * 1024
    return settings.QW_MAX_PAYLOAD_BYTES


def test_ref_resolves_as_jmespath_does():
    assert resolve({"a": [doubling(3), {"$ref": "length(input.s)"}]}, CTX) == {"a": [[1] * 8, 2]}


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        pytest.param({"$ref": "input.big"}, "over 65536 bytes", id="large-but-cheap"),
        pytest.param(doubling(99), "units of work", id="flatten-doubling"),
        pytest.param(doubling(99, " | [@,@]"), "over 65536 bytes", id="shared-tree"),
        pytest.param(
            {"$ref": "to_string(input.x" + " | [@,@]" * 99 + ")"},
            "units of work",
            id="to-string-of-a-shared-tree",
        ),
        pytest.param(
            {
                "$ref": "[input.x" + " | [@,@]" * 50 + ", input.x" + " | [@,@]" * 50 + "]"
                " | [0] == [1]"
            },
            "units of work",
            id="equality-of-shared-trees",
        ),
        pytest.param(
            {"$ref": "input.s" + " | join('', [@,@,@,@])" * 40},
            "units of work",
            id="string-growth",
        ),
    ],
)
def test_ref_that_grows_without_bound_stops_quickly_with_a_reason(ref, message):
    started = time.monotonic()

    with pytest.raises(RefError) as excinfo:
        resolve({"result": ref}, CTX, path="steps.b.payload")

    assert time.monotonic() - started < 5
    assert str(excinfo.value).startswith("steps.b.payload")
    assert message in str(excinfo.value)


def test_ref_error_of_the_expression_names_the_path():
    with pytest.raises(RefError) as excinfo:
        resolve({"k": {"$ref": "length(input.n)"}}, CTX, path="steps.b.payload")

    assert str(excinfo.value).startswith("steps.b.payload.k.$ref: In function length()")


def test_json_size_counts_utf8_bytes_and_stops_past_the_limit():
    shared: list = [1]
    for _ in range(60):
        shared = [shared, shared]  # 2**60 copies once encoded

    assert json_size({"é": "ü"}, 100) == len('{"é":"ü"}'.encode())
    assert 100 < json_size(shared, 100) < 200
