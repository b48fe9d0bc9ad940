"""The run picture (``workflows_app.graph.render``): a pure function, tested without a database."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from workflows_app import graph as picture
from workflows_app.definition import Graph, Step, validate

SVG = "{http://www.w3.org/2000/svg}"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

SHOP = {
    "start": "reserve",
    "steps": {
        "reserve": {"type": "NOOP", "next": ["charge", "notify"], "compensation": {"type": "NOOP"}},
        "charge": {"type": "NOOP", "next": "ship", "compensation": {"type": "NOOP"}},
        "notify": {"type": "NOOP", "next": "ship"},
        "ship": {"type": "NOOP", "next": "invoice"},
        "invoice": {"type": "NOOP"},
    },
}


def step(name, status=None, attempts=1, start_s=0.0, took_s=0.5):
    started = T0 + timedelta(seconds=start_s) if status else None
    finished = started + timedelta(seconds=took_s) if started and took_s is not None else None
    return {
        "name": name,
        "type": "NOOP",
        "task": f"task-{name}" if status else None,
        "status": status,
        "result": None,
        "attempts": attempts if status else 0,
        "started_at": started,
        "finished_at": finished,
    }


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg"
    return root


def nodes(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-step"): g for g in root.iter(f"{SVG}g") if g.get("class") == "qwg-step"}


def names_drawn(root: ET.Element) -> list[str]:
    return [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "qwg-step-name"]


def failed_shop_run():
    """reserve, charge, notify done; ship failed; charge then reserve undone."""
    steps = [
        step("reserve", "COMPLETED", start_s=0),
        step("charge", "COMPLETED", start_s=1),
        step("notify", "COMPLETED", attempts=2, start_s=1, took_s=2),
        step("ship", "FAILED", start_s=4),
        step("invoice"),
    ]
    compensations = [
        {"step": "charge", "task": "undo-charge", "status": "COMPLETED", "finished_at": T0},
        {"step": "reserve", "task": "undo-reserve", "status": "PROCESSING", "finished_at": None},
    ]
    return steps, compensations


def test_render_names_every_step_once_in_a_text_element_and_parses_as_xml():
    graph = validate(SHOP)
    steps, compensations = failed_shop_run()

    root = parse(picture.render(graph, steps, compensations))

    assert sorted(names_drawn(root)) == sorted(SHOP["steps"])
    assert set(nodes(root)) == set(SHOP["steps"])


def test_render_colours_each_step_by_its_status_and_marks_not_started():
    names = ["a", "b", "c", "d", "e", "f", "g"]
    definition = {
        "start": "a",
        "steps": {
            n: {"type": "NOOP", **({"next": nxt} if nxt else {})}
            for n, nxt in zip(names, [*names[1:], None], strict=True)
        },
    }
    statuses = ["COMPLETED", "FAILED", "CANCELLED", "RETRYING", "PROCESSING", "PENDING", None]
    steps = [step(n, s) for n, s in zip(names, statuses, strict=True)]

    root = parse(picture.render(validate(definition), steps, []))

    drawn = nodes(root)
    for name, status in zip(names, statuses, strict=True):
        key = status or picture.NOT_STARTED
        fill, stroke, _ = picture.STYLES[key]
        rect = drawn[name].find(f"{SVG}rect")
        assert drawn[name].get("data-status") == key
        assert (rect.get("fill"), rect.get("stroke")) == (fill, stroke), name
    assert drawn["g"].find(f"{SVG}rect").get("stroke-dasharray")  # not started: dashed
    assert drawn["a"].find(f"{SVG}rect").get("stroke-dasharray") is None


def test_tooltip_gives_status_attempts_and_duration():
    graph = validate(SHOP)
    steps, compensations = failed_shop_run()

    root = parse(picture.render(graph, steps, compensations))

    notify = nodes(root)["notify"].find(f"{SVG}title").text
    assert "notify: completed" in notify and "attempts 2" in notify and "took 2.00 s" in notify
    assert "COMPLETED · 2 attempts" in "".join(nodes(root)["notify"].itertext())
    invoice = nodes(root)["invoice"].find(f"{SVG}title").text
    assert "not started" in invoice and "attempts" not in invoice


def test_layers_follow_topological_depth_fan_out_shares_a_column():
    graph = validate(SHOP)
    steps, compensations = failed_shop_run()

    root = parse(picture.render(graph, steps, compensations))

    x = {n: float(g.find(f"{SVG}rect").get("x")) for n, g in nodes(root).items()}
    assert x["reserve"] < x["charge"] == x["notify"] < x["ship"] < x["invoice"]
    assert picture.layers(graph) == [["reserve"], ["charge", "notify"], ["ship"], ["invoice"]]


def test_edges_are_the_next_arrows_dark_once_the_successor_started():
    graph = validate(SHOP)
    steps, compensations = failed_shop_run()

    root = parse(picture.render(graph, steps, compensations))

    edges = {
        (p.get("data-from"), p.get("data-to")): p
        for p in root.iter(f"{SVG}path")
        if p.get("class") == "qwg-edge"
    }
    assert set(edges) == {(n, s) for n in graph.order for s in graph.successors(n)}
    assert all(p.get("marker-end", "").startswith("url(#qwg-arrow") for p in edges.values())
    assert edges[("charge", "ship")].get("stroke") == picture.EDGE_DONE
    assert edges[("ship", "invoice")].get("stroke") == picture.EDGE_LATER


def test_compensation_path_runs_from_the_failure_through_the_undone_steps():
    graph = validate(SHOP)
    steps, compensations = failed_shop_run()

    root = parse(picture.render(graph, steps, compensations))

    undo = [p for p in root.iter(f"{SVG}path") if p.get("class") == "qwg-undo-edge"]
    assert [(p.get("data-from"), p.get("data-to")) for p in undo] == [
        ("ship", "charge"),
        ("charge", "reserve"),
    ]
    assert all(p.get("stroke-dasharray") for p in undo)
    assert [p.get("data-status") for p in undo] == ["COMPLETED", "PROCESSING"]
    assert undo[1].get("stroke") == picture.STYLES["PROCESSING"][1]
    chips = [g for g in root.iter(f"{SVG}g") if g.get("class") == "qwg-undo-chip"]
    assert [(c.get("data-step"), c.find(f"{SVG}text").text) for c in chips] == [
        ("ship", "ship failed"),
        ("charge", "undo 1 · charge: completed"),
        ("reserve", "undo 2 · reserve: processing"),
    ]
    assert "task undo-reserve" in chips[2].find(f"{SVG}title").text
    badges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "qwg-undo-badge"]
    assert [(b.get("data-step"), b.get("data-status")) for b in badges] == [
        ("charge", "COMPLETED"),
        ("reserve", "PROCESSING"),
    ]
    legend = [
        g.get("data-status") for g in root.iter(f"{SVG}g") if g.get("class") == "qwg-legend-item"
    ]
    assert legend == [*picture.STYLES, "UNDO"]


def test_run_without_compensations_has_no_undo_path_nor_its_legend():
    graph = validate(SHOP)
    steps = [step("reserve", "PROCESSING")] + [step(n) for n in graph.order[1:]]

    root = parse(picture.render(graph, steps, []))

    classes = {e.get("class") for e in root.iter()}
    assert not classes & {"qwg-undo-edge", "qwg-undo-chip", "qwg-undo-badge"}
    assert "UNDO" not in {g.get("data-status") for g in root.iter(f"{SVG}g")}


def test_an_edge_that_skips_a_column_is_routed_above_the_steps_between():
    definition = {
        "start": "a",
        "steps": {
            "a": {"type": "NOOP", "next": ["b", "c"]},
            "b": {"type": "NOOP", "next": "c"},
            "c": {"type": "NOOP"},
        },
    }
    graph = validate(definition)

    root = parse(picture.render(graph, [step(n) for n in graph.order], []))

    skip = next(
        p for p in root.iter(f"{SVG}path") if p.get("data-to") == "c" and p.get("data-from") == "a"
    )
    b_top = float(nodes(root)["b"].find(f"{SVG}rect").get("y"))
    lane = float(skip.get("d").split(" L")[1].split(",")[1].split(" ")[0])
    assert lane < b_top


def test_text_is_escaped_even_though_step_names_are_validated():
    odd = "a<b>&\"c'"
    graph = Graph(
        start=odd,
        steps={odd: Step(name=odd, type="NO<OP>", payload={}, next=())},
        predecessors={odd: ()},
        order=(odd,),
    )

    svg = picture.render(graph, [step(odd, "FAILED")], [])

    assert "<b>" not in svg
    root = parse(svg)
    assert names_drawn(root) == [odd]
    assert "NO<OP>" in nodes(root)[odd].find(f"{SVG}title").text


def test_a_long_chain_renders_wide_with_each_step():
    definition = {
        "start": "s0",
        "steps": {f"s{i}": {"type": "NOOP", "next": f"s{i + 1}"} for i in range(199)}
        | {"s199": {"type": "NOOP"}},
    }
    graph = validate(definition)

    root = parse(picture.render(graph, [step(n) for n in graph.order], []))

    assert len(names_drawn(root)) == 200
    assert float(root.get("width")) > 200 * picture.MIN_NODE_W


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0123, "12 ms"), (3.4, "3.40 s"), (125, "2 min 05 s")],
)
def test_duration_text(seconds, text):
    assert picture.duration_text(T0, T0 + timedelta(seconds=seconds)) == text
    assert picture.duration_text(T0, None) == ""
