"""The work the suite submits (no-op, HTTP and data tasks, workflow definitions) and the
helpers that submit it through the API.

``data_task`` is the hook for data work: it submits ``DATA_PROCESSING`` when that
type is registered, and a labelled ``NOOP`` stand-in of the same weight otherwise, so the mix
keeps its shape while the type is being built. ``DATA_WORK`` says which one a run used.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from tasks_app.handlers import registry

STEP_MAX_RETRIES = 10


def noop_task(sleep_ms: int = 0, *, max_retries: int = STEP_MAX_RETRIES) -> dict[str, Any]:
    return {
        "type": "NOOP",
        "payload": {"sleep_ms": sleep_ms} if sleep_ms else {},
        "max_retries": max_retries,
    }


def http_task(base_url: str, n: int) -> dict[str, Any]:
    """A GET or a POST (a method with effects: it carries ``Idempotency-Key: qw-<task id>``)."""
    if n % 2:
        payload: dict[str, Any] = {"url": f"{base_url}/orders", "method": "POST", "json": {"n": n}}
    else:
        payload = {"url": f"{base_url}/items", "method": "GET", "params": {"n": str(n)}}
    payload["timeout_s"] = 5
    return {"type": "HTTP_REQUEST", "payload": payload, "timeout_s": 10, "max_retries": 5}


def data_processing_available() -> bool:
    return registry.get("DATA_PROCESSING") is not None


DATA_WORK = (
    "DATA_PROCESSING" if data_processing_available() else "NOOP stand-in for DATA_PROCESSING"
)


COUNTRIES = ("DE", "FR", "IT", "ES")


def data_records(n: int, rows: int) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "email": f" User{i}@Example.com ",
            "age": str(15 + (i * 7 + n) % 50),
            "country": COUNTRIES[(i + n) % len(COUNTRIES)],
            "amount": (i * 13 + n) % 97,
        }
        for i in range(rows)
    ]


def data_expected(n: int, rows: int) -> set[tuple[str, int, int]]:
    """What ``data_task(n, rows)`` must produce: (country, people, total) per country."""
    groups: dict[str, tuple[int, int]] = {}
    for record in data_records(n, rows):
        if int(record["age"]) >= 18:
            people, total = groups.get(record["country"], (0, 0))
            groups[record["country"]] = (people + 1, total + record["amount"])
    return {(country, people, total) for country, (people, total) in groups.items()}


def data_task(
    n: int, rows: int = 40, *, batch_size: int | None = None, timeout_s: int = 30
) -> dict[str, Any]:
    """Data work: a small inline pipeline (in batches of ``batch_size`` rows, a chord, when
    given), or its stand-in while the type is not registered."""
    if not data_processing_available():
        return {**noop_task(sleep_ms=5), "payload": {"sleep_ms": 5, "result": {"data": n}}}
    records = data_records(n, rows)
    operations = [
        {"op": "clean", "trim": True, "lower": ["email"]},
        {"op": "cast", "fields": {"age": "int"}},
        {"op": "filter", "where": {"field": "age", "gte": 18}},
        {"op": "dedupe", "keys": ["email"], "keep": "first"},
        {
            "op": "aggregate",
            "group_by": ["country"],
            "metrics": {"people": {"count": "*"}, "total": {"sum": "amount"}},
        },
        {"op": "sort", "by": [{"field": "total", "desc": True}]},
    ]
    payload: dict[str, Any] = {"records": records, "operations": operations}
    if batch_size is not None:
        payload["batch_size"] = batch_size
    return {
        "type": "DATA_PROCESSING",
        "payload": payload,
        "timeout_s": timeout_s,
        "max_retries": STEP_MAX_RETRIES,
    }


def fan_out_fan_in(sleep_ms: int = 60) -> dict[str, Any]:
    """Ten steps: start → four branches of two → join (the join waits for all four)."""
    step = {
        "type": "NOOP",
        "payload": {"sleep_ms": sleep_ms},
        "max_retries": STEP_MAX_RETRIES,
    }
    steps: dict[str, Any] = {"start": {**step, "next": ["a1", "b1", "c1", "d1"]}}
    for branch in "abcd":
        steps[f"{branch}1"] = {**step, "next": f"{branch}2"}
        steps[f"{branch}2"] = {**step, "next": "join"}
    steps["join"] = {**step, "payload": {"result": {"$ref": "[steps.a2.status, steps.d2.status]"}}}
    return {"start": "start", "steps": steps}


PATHS = ("/orders", "/items", "/reserve", "/charge", "/notify", "/ship", "/undo")  # of the above


def order_saga(base_url: str) -> dict[str, Any]:
    """Four steps with HTTP calls: reserve → (charge, notify) → ship, each with an undo."""

    def call(path: str, method: str = "POST") -> dict[str, Any]:
        return {
            "type": "HTTP_REQUEST",
            "payload": {"url": f"{base_url}{path}", "method": method, "timeout_s": 5},
            "timeout_s": 10,
            "max_retries": STEP_MAX_RETRIES,
        }

    undo = {"type": "HTTP_REQUEST", "payload": {"url": f"{base_url}/undo", "method": "POST"}}
    return {
        "start": "reserve",
        "steps": {
            "reserve": {**call("/reserve"), "next": ["charge", "notify"], "compensation": undo},
            "charge": {**call("/charge"), "next": "ship", "compensation": undo},
            "notify": {**call("/notify", "GET"), "next": "ship"},
            "ship": call("/ship"),
        },
    }


def sleeps(n: int, low_ms: int, high_ms: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low_ms, high_ms) for _ in range(n)]


# --- submitting work through the API (an in-process APIClient) ------------------------------


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def submit_bulk(client: Any, bodies: list[dict[str, Any]], batch: int = 500) -> list[str]:
    """Create tasks through ``POST /api/tasks/bulk/`` (an in-process ``APIClient``)."""
    ids: list[str] = []
    for part in chunks(bodies, batch):
        response = client.post("/api/tasks/bulk/", {"tasks": part}, format="json")
        assert response.status_code == 201, response.content[:2000]
        ids += response.json()["ids"]
    return ids


def submit_each(client: Any, bodies: list[dict[str, Any]]) -> list[str]:
    """Create tasks one by one through ``POST /api/tasks/``: one message each, so they spread
    over every pool process (a bulk create groups its ids into a few multi-id messages)."""
    ids: list[str] = []
    for body in bodies:
        response = client.post("/api/tasks/", body, format="json")
        assert response.status_code == 201, response.content[:2000]
        ids.append(str(response.json()["id"]))
    return ids


def create_workflow(client: Any, name: str, definition: dict[str, Any]) -> str:
    response = client.post(
        "/api/workflows/", {"name": name, "definition": definition}, format="json"
    )
    assert response.status_code == 201, response.content[:2000]
    return str(response.json()["id"])


def start_runs(client: Any, workflow_id: str, n: int) -> list[str]:
    runs = []
    for _ in range(n):
        response = client.post(f"/api/workflows/{workflow_id}/runs/", {}, format="json")
        assert response.status_code == 201, response.content[:2000]
        runs.append(str(response.json()["id"]))
    return runs
