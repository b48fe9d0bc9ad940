"""The picture of a run: its step graph as inline SVG, drawn on the server without JavaScript.

``render(graph, steps, compensations)`` is a pure function of the validated definition and
what ``selectors.run_steps`` says about the run:

1. Layers: a step's column is its topological depth (0 for ``start``, else one more than its
   deepest predecessor), found in one pass over ``graph.order``. Within a column, steps are
   ordered by the mean height of their predecessors (fewer crossings), then by graph order,
   and each column is centred vertically.
2. Edges (``next``) are arrows from a step's right side to its successor's left side; an edge
   that skips columns is routed above the steps it would cross. An edge is dark once its
   successor has started.
3. Each step is a box coloured by its task's status ("not started": white, dashed border),
   labelled with its name (a ``<text>``) and status, with a ``<title>`` tooltip giving status,
   attempts, type and duration.
4. The undo, in a lane under the steps so its arrows never cross them: one chip per stop,
   under its step's column — the step whose failure started it, then each compensation in
   the order it was created (reverse completion order) — joined by dashed arrows. Chips,
   arrows and an "undo n" badge on the compensated step are coloured by the compensation
   task's status.
5. A legend of the colours and of the compensation path.

Every text is escaped; element ids carry the ``qwg-`` prefix and no ``<style>`` element is
emitted, so the SVG can be inlined in any page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from itertools import pairwise
from typing import Any

from django.utils.html import escape

from workflows_app.definition import Graph

NOT_STARTED = "NOT_STARTED"

#: status → (fill, stroke, legend label); the order is the legend's.
STYLES: dict[str, tuple[str, str, str]] = {
    NOT_STARTED: ("#ffffff", "#adb5bd", "not started"),
    "PENDING": ("#e7f5ff", "#1c7ed6", "pending"),
    "PROCESSING": ("#fff3bf", "#e67700", "processing"),
    "RETRYING": ("#ffe8cc", "#d9480f", "retrying"),
    "COMPLETED": ("#d3f9d8", "#2b8a3e", "completed"),
    "FAILED": ("#ffe3e3", "#c92a2a", "failed"),
    "CANCELLED": ("#e9ecef", "#495057", "cancelled"),
}
BROKEN_STATUSES = ("FAILED", "CANCELLED")

MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
SANS = "-apple-system, 'Segoe UI', system-ui, Roboto, 'Helvetica Neue', Arial, sans-serif"
NAME_SIZE = 12  # px, monospace: about 0.6 em per character
NAME_CHAR_W = 7.4
SMALL_SIZE = 10
SMALL_CHAR_W = 6.3
TEXT = "#212529"
MUTED = "#6c757d"
EDGE_DONE = "#495057"
EDGE_LATER = "#ced4da"

PAD = 20
NODE_H = 46
MIN_NODE_W = 150
NODE_PAD_X = 12
COL_GAP = 56
ROW_GAP = 30
SKIP_GUTTER = 22  # above the steps, for edges that skip columns
LANE_GAP = 26  # between the steps and the undo lane below them
CHIP_H = 18
CHIP_GAP = 34  # room for an arrow between two chips
MIN_WIDTH = 560.0
LEGEND_H = 22


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    column: int

    @property
    def cy(self) -> float:
        return self.y + NODE_H / 2

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + NODE_H


def render(
    graph: Graph,
    steps: Sequence[Mapping[str, Any]],
    compensations: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The SVG (one ``<svg>`` element) of ``graph`` with the run's ``steps`` and
    ``compensations`` as ``selectors.run_steps`` returns them."""
    by_name = {str(s["name"]): s for s in steps}
    columns = layers(graph)
    depth = {name: index for index, column in enumerate(columns) for name in column}
    has_skips = any(depth[s] - depth[n] > 1 for n in graph.order for s in graph.successors(n))
    top = PAD + (SKIP_GUTTER if has_skips else 0)
    boxes = layout(graph, columns, by_name, top)
    undo_path = _undo_path(by_name, compensations)
    steps_bottom = max(b.bottom for b in boxes.values())
    chips = _chips(undo_path, boxes, by_name, compensations, steps_bottom + LANE_GAP)
    graph_w = max([b.right for b in boxes.values()] + [c.x + c.w for c in chips]) + PAD
    graph_h = max([steps_bottom] + [c.y + CHIP_H for c in chips]) + PAD
    width = max(graph_w, MIN_WIDTH)
    legend, legend_h = _legend(width, graph_h, bool(chips))
    height = graph_h + legend_h + PAD
    count = len(graph.steps)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="qwg" role="img" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'aria-label="{_e(f"Step graph of the run: {count} steps")}" '
        f'font-family="{_e(SANS)}">',
        _defs(),
        f'<rect x="0.5" y="0.5" width="{width - 1:.0f}" height="{height - 1:.0f}" rx="6" '
        f'fill="#f8f9fa" stroke="#dee2e6"/>',
        '<g class="qwg-edges">',
        *_edges(graph, boxes, by_name),
        "</g>",
        '<g class="qwg-steps">',
        *(_node(name, boxes[name], by_name.get(name), graph) for name in graph.order),
        "</g>",
        *_undo(chips, boxes),
        legend,
        "</svg>",
    ]
    return "".join(parts)


def layers(graph: Graph) -> list[list[str]]:
    """Steps grouped by topological depth, each group in graph order."""
    depth: dict[str, int] = {}
    for name in graph.order:
        depth[name] = max((depth[p] + 1 for p in graph.predecessors.get(name, ())), default=0)
    columns: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for name in graph.order:
        columns[depth[name]].append(name)
    return columns


def layout(
    graph: Graph,
    columns: list[list[str]],
    by_name: Mapping[str, Mapping[str, Any]],
    top: float,
) -> dict[str, Box]:
    rows = max(len(c) for c in columns)
    pitch = NODE_H + ROW_GAP
    rank = {name: index for index, name in enumerate(graph.order)}
    boxes: dict[str, Box] = {}
    x = float(PAD)

    def barycentre(name: str) -> tuple[float, int]:
        preds = graph.predecessors.get(name, ())
        return (sum(boxes[p].cy for p in preds) / len(preds), rank[name])

    for index, names in enumerate(columns):
        column = sorted(names, key=barycentre) if index else names
        width = max(_node_width(name, by_name.get(name)) for name in column)
        offset = (rows - len(column)) / 2
        for row, name in enumerate(column):
            boxes[name] = Box(x=x, y=top + (offset + row) * pitch, w=width, column=index)
        x += width + COL_GAP
    return boxes


def status_of(step: Mapping[str, Any] | None) -> str:
    status = step.get("status") if step else None
    return str(status) if status in STYLES else NOT_STARTED


def duration_text(started: datetime | None, finished: datetime | None) -> str:
    """``12 ms``, ``3.40 s`` or ``2 min 05 s``; empty until both times are known."""
    if started is None or finished is None:
        return ""
    seconds = max((finished - started).total_seconds(), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _e(value: object) -> str:
    return str(escape(str(value)))


def _status_line(step: Mapping[str, Any] | None) -> str:
    status = status_of(step)
    if status == NOT_STARTED:
        return "not started"
    attempts = int(step.get("attempts") or 0) if step else 0
    return f"{status} · {attempts} attempts" if attempts > 1 else status


def _node_width(name: str, step: Mapping[str, Any] | None) -> float:
    return max(
        MIN_NODE_W,
        len(name) * NAME_CHAR_W + 2 * NODE_PAD_X,
        len(_status_line(step)) * SMALL_CHAR_W + 2 * NODE_PAD_X,
    )


def _marker_id(status: str) -> str:
    return f"qwg-arrow-{status.lower()}"


def _defs() -> str:
    colours = {"edge-done": EDGE_DONE, "edge-later": EDGE_LATER}
    colours.update({status: stroke for status, (_, stroke, _) in STYLES.items()})
    markers = "".join(
        f'<marker id="{_marker_id(key)}" viewBox="0 0 10 10" refX="9" refY="5" '
        f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        f'<path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
        for key, colour in colours.items()
    )
    return f"<defs>{markers}</defs>"


def _edges(
    graph: Graph, boxes: Mapping[str, Box], by_name: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    out = []
    for name in graph.order:
        src = boxes[name]
        for successor in graph.successors(name):
            dst = boxes[successor]
            x1, y1, x2, y2 = src.right, src.cy, dst.x - 2, dst.cy
            if dst.column - src.column > 1:
                between = [b.y for b in boxes.values() if src.column < b.column < dst.column]
                lane = min([*(y - 12 for y in between), y1, y2])
                d = (
                    f"M{x1:.1f},{y1:.1f} C{x1 + 28:.1f},{y1:.1f} {x1 + 14:.1f},{lane:.1f} "
                    f"{x1 + 42:.1f},{lane:.1f} L{x2 - 42:.1f},{lane:.1f} "
                    f"C{x2 - 14:.1f},{lane:.1f} {x2 - 28:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
                )
            else:
                mid = (x1 + x2) / 2
                d = f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
            started = status_of(by_name.get(successor)) != NOT_STARTED
            key = "edge-done" if started else "edge-later"
            colour = EDGE_DONE if started else EDGE_LATER
            out.append(
                f'<path class="qwg-edge" data-from="{_e(name)}" data-to="{_e(successor)}" '
                f'd="{d}" fill="none" stroke="{colour}" stroke-width="1.5" '
                f'marker-end="url(#{_marker_id(key)})"><title>{_e(name)} → {_e(successor)}'
                f"</title></path>"
            )
    return out


def _node(name: str, box: Box, step: Mapping[str, Any] | None, graph: Graph) -> str:
    status = status_of(step)
    fill, stroke, label = STYLES[status]
    dash = ' stroke-dasharray="5 3"' if status == NOT_STARTED else ""
    ink = MUTED if status == NOT_STARTED else stroke
    tip = [f"{name}: {label}", f"type {graph.steps[name].type}"]
    if step and status != NOT_STARTED:
        tip.append(f"attempts {int(step.get('attempts') or 0)}")
        took = duration_text(step.get("started_at"), step.get("finished_at"))
        if took:
            tip.append(f"took {took}")
        if step.get("task"):
            tip.append(f"task {step['task']}")
    return (
        f'<g class="qwg-step" data-step="{_e(name)}" data-status="{_e(status)}">'
        f"<title>{_e(' · '.join(tip))}</title>"
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" height="{NODE_H}" rx="6" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
        f'<text class="qwg-step-name" x="{box.cx:.1f}" y="{box.y + 19:.1f}" '
        f'text-anchor="middle" font-family="{_e(MONO)}" font-size="{NAME_SIZE}" '
        f'font-weight="600" fill="{TEXT}">{_e(name)}</text>'
        f'<text class="qwg-step-status" x="{box.cx:.1f}" y="{box.y + 35:.1f}" '
        f'text-anchor="middle" font-size="{SMALL_SIZE}" fill="{ink}">'
        f"{_e(_status_line(step))}</text>"
        "</g>"
    )


def _undo_path(
    by_name: Mapping[str, Mapping[str, Any]], compensations: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The steps the undo went through: the first broken step, then the compensated ones."""
    compensated = [str(c["step"]) for c in compensations if c.get("step") in by_name]
    if not compensated:
        return []
    broken = [
        s
        for s in by_name.values()
        if s.get("status") in BROKEN_STATUSES and s["name"] not in compensated
    ]
    if broken:
        first = min(
            broken,
            key=lambda s: (s.get("finished_at") is None, s.get("finished_at") or 0, s["name"]),
        )
        return [str(first["name"]), *compensated]
    return compensated


@dataclass(frozen=True)
class Chip:
    """One stop of the undo lane, under its step's column: where the undo started, or one
    compensation, in order."""

    step: str
    index: int  # 0: the step whose failure started the undo; n: the n-th compensation
    status: str
    text: str
    tip: str
    x: float
    y: float
    w: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + CHIP_H / 2


def _chips(
    path: list[str],
    boxes: Mapping[str, Box],
    by_name: Mapping[str, Mapping[str, Any]],
    compensations: Sequence[Mapping[str, Any]],
    top: float,
) -> list[Chip]:
    """The undo lane: one row read right to left, like the undo itself; each chip under its
    step's column, or further left when the chip before it is in the way (then the whole
    row moves right if it would start before the margin)."""
    by_step = {str(c["step"]): c for c in compensations}
    chips: list[Chip] = []
    limit = float("inf")
    count = 0
    for name in path:
        undo = by_step.get(name)
        if undo is None:  # the broken step the undo started from
            index, status = 0, status_of(by_name.get(name))
            label = STYLES[status][2]
            text, tip = f"{name} {label}", f"{name} {label}: the undo starts here"
        else:
            count += 1
            index, status = count, status_of(undo)
            label = STYLES[status][2]
            text = f"undo {index} · {name}: {label}"
            tip = f"compensation {index}, of {name}: {label} (task {undo.get('task')})"
        w = len(text) * SMALL_CHAR_W + 20
        limit = x = min(boxes[name].cx - w / 2, limit - CHIP_GAP - w)
        chips.append(Chip(name, index, status, text, tip, x, top, w))
    shift = max(0.0, PAD - min((c.x for c in chips), default=PAD))
    return [replace(c, x=c.x + shift) for c in chips]


def _undo(chips: list[Chip], boxes: Mapping[str, Box]) -> list[str]:
    if not chips:
        return []
    out = ['<g class="qwg-undo">']
    for src, dst in pairwise(chips):
        _, stroke, label = STYLES[dst.status]
        x1, x2, y = src.x, dst.x + dst.w + 2, src.cy  # the lane reads right to left
        out.append(
            f'<path class="qwg-undo-edge" data-from="{_e(src.step)}" data-to="{_e(dst.step)}" '
            f'data-status="{_e(dst.status)}" d="M{x1:.1f},{y:.1f} L{x2:.1f},{y:.1f}" '
            f'fill="none" stroke="{stroke}" stroke-width="2" stroke-dasharray="6 4" '
            f'marker-end="url(#{_marker_id(dst.status)})">'
            f"<title>{_e(f'compensation {dst.index}, of {dst.step}: {label}')}</title></path>"
        )
    for chip in chips:
        fill, stroke, _ = STYLES[chip.status]
        dash = ' stroke-dasharray="3 2"' if chip.index else ""
        out.append(
            f'<g class="qwg-undo-chip" data-step="{_e(chip.step)}" data-index="{chip.index}" '
            f'data-status="{_e(chip.status)}"><title>{_e(chip.tip)}</title>'
            f'<rect x="{chip.x:.1f}" y="{chip.y:.1f}" width="{chip.w:.1f}" height="{CHIP_H}" '
            f'rx="9" fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
            f'<text x="{chip.cx:.1f}" y="{chip.y + 12.5:.1f}" text-anchor="middle" '
            f'font-size="{SMALL_SIZE}" fill="{stroke}">{_e(chip.text)}</text></g>'
        )
        if chip.index:  # and a badge on the step itself
            box = boxes[chip.step]
            text = f"undo {chip.index}"
            w = len(text) * SMALL_CHAR_W + 12
            x, y = box.right - w - 8, box.y - 12
            out.append(
                f'<g class="qwg-undo-badge" data-step="{_e(chip.step)}" '
                f'data-status="{_e(chip.status)}"><title>{_e(chip.tip)}</title>'
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="15" rx="7.5" '
                f'fill="{fill}" stroke="{stroke}" stroke-dasharray="3 2"/>'
                f'<text x="{x + w / 2:.1f}" y="{y + 11:.1f}" text-anchor="middle" '
                f'font-size="{SMALL_SIZE}" fill="{stroke}">{_e(text)}</text></g>'
            )
    out.append("</g>")
    return out


def _legend(width: float, top: float, with_undo: bool) -> tuple[str, float]:
    """The legend in rows that fit ``width``; returns the SVG and its height."""
    entries = [(status, label) for status, (_, _, label) in STYLES.items()]
    if with_undo:
        entries.append(
            ("UNDO", "the undo, in order (dashed: a compensation, coloured by its status)")
        )
    out = ['<g class="qwg-legend">']
    x, y = float(PAD), top
    for kind, label in entries:
        sample_w = 34 if kind == "UNDO" else 14
        w = sample_w + 6 + len(label) * SMALL_CHAR_W + 16
        if x + w > width - PAD and x > PAD:
            x, y = float(PAD), y + LEGEND_H
        if kind == "UNDO":
            sample = (
                f'<path d="M{x:.1f},{y + 7:.1f} l28,0" stroke="{MUTED}" stroke-width="2" '
                f'stroke-dasharray="6 4" marker-end="url(#{_marker_id("CANCELLED")})"/>'
            )
        else:
            fill, stroke, _ = STYLES[kind]
            dash = ' stroke-dasharray="3 2"' if kind == NOT_STARTED else ""
            sample = (
                f'<rect x="{x:.1f}" y="{y:.1f}" width="14" height="14" rx="3" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="1.5"{dash}/>'
            )
        out.append(
            f'<g class="qwg-legend-item" data-status="{_e(kind)}">{sample}'
            f'<text x="{x + sample_w + 6:.1f}" y="{y + 11:.1f}" font-size="{SMALL_SIZE + 1}" '
            f'fill="{TEXT}">{_e(label)}</text></g>'
        )
        x += w
    out.append("</g>")
    return "".join(out), y + 14 - top  # the last row: its 14 px swatches
