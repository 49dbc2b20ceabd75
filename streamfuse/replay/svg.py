"""Small inline-SVG plots for the replay report: line charts and a timeline.

Pure functions from numbers to SVG text (no plotting library): the report stays one
self-contained HTML file that any browser renders.
"""

from __future__ import annotations

import math
from html import escape
from typing import Iterable, Sequence

PALETTE = {"fused": "#111111", "image": "#1f77b4", "audio": "#ff7f0e", "series": "#2ca02c", "ume": "#7f7f7f",
           "A": "#1f77b4", "B": "#d62728"}
EXTRA = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
FAULT_FILL = "#f8d7da"


def color(name: str, i: int = 0) -> str:
    """A stable colour per series name.

    Examples:
        >>> color("fused"), color("other", 1)
        ('#111111', '#8c564b')
    """
    return PALETTE.get(name, EXTRA[i % len(EXTRA)])


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


class _Frame:
    """Maps data coordinates to the plot area of a ``width`` x ``height`` SVG."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, width: int, height: int,
                 left: int = 48, right: int = 110, top: int = 28, bottom: int = 30) -> None:
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.left, self.top = left, top
        self.w, self.h = width - left - right, height - top - bottom

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * self.w

    def y(self, v: float) -> float:
        return self.top + (1 - (v - self.y0) / (self.y1 - self.y0)) * self.h


def _open(width: int, height: int, title: str, kind: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot {kind}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
            f'<title>{escape(title)}</title>',
            f'<text x="8" y="17" font-size="13" font-weight="bold">{escape(title)}</text>']


def _bands(f: _Frame, bands: Iterable[tuple[float, float, str]]) -> list[str]:
    out = []
    for a, b, label in bands:
        a, b = max(a, f.x0), min(b, f.x1)
        if b <= a:
            continue
        out.append(f'<rect class="fault" x="{f.x(a):.1f}" y="{f.top}" width="{f.x(b) - f.x(a):.1f}" height="{f.h}" '
                   f'fill="{FAULT_FILL}"><title>{escape(label)}</title></rect>')
    return out


def nice_step(span: float, ticks: int = 8) -> float:
    """A 1-2-5 step giving at most about ``ticks`` ticks over ``span``.

    Examples:
        >>> nice_step(39.8), nice_step(3600), nice_step(0.7)
        (5.0, 500.0, 0.1)
    """
    raw = max(span, 1e-9) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1.0, 2.0, 5.0, 10.0) if m * mag >= raw)


def _x_axis(f: _Frame, ticks: int = 8) -> list[str]:
    out = [f'<line x1="{f.left}" y1="{f.top + f.h}" x2="{f.left + f.w}" y2="{f.top + f.h}" stroke="#999"/>']
    step = nice_step(f.x1 - f.x0, ticks)
    first = math.ceil(f.x0 / step)
    for i in range(first, int(math.floor(f.x1 / step)) + 1):
        v = i * step
        out.append(f'<text x="{f.x(v):.1f}" y="{f.top + f.h + 16}" font-size="10" text-anchor="middle">'
                   f'{_fmt(v)}s</text>')
    return out


def line_chart(xs: Sequence[float], series: dict[str, Sequence[float | None]], title: str,
               y_range: tuple[float, float] = (0.0, 1.0), bands: Iterable[tuple[float, float, str]] = (),
               width: int = 760, height: int = 220, x_range: tuple[float, float] | None = None) -> str:
    """A line chart; ``None`` values break a line. ``bands`` shade ``(x0, x1, label)``.

    Examples:
        >>> svg = line_chart([0, 1, 2], {"fused": [0.9, None, 0.8]}, "Top-1")
        >>> svg.startswith("<svg") and svg.count("<polyline") == 2
        True
    """
    lo, hi = x_range or ((min(xs), max(xs)) if xs else (0.0, 1.0))
    f = _Frame(lo, hi, y_range[0], y_range[1], width, height)
    out = _open(width, height, title, "chart") + _bands(f, bands) + _x_axis(f)
    for i in range(5):
        v = y_range[0] + (y_range[1] - y_range[0]) * i / 4
        out.append(f'<line x1="{f.left}" y1="{f.y(v):.1f}" x2="{f.left + f.w}" y2="{f.y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{f.left - 6}" y="{f.y(v) + 3:.1f}" font-size="10" text-anchor="end">{v:.2f}</text>')
    for i, (name, ys) in enumerate(series.items()):
        c = color(name, i)
        run: list[str] = []
        for x, y in [*zip(xs, ys), (None, None)]:
            if y is None or x is None:
                if run:
                    out.append(f'<polyline class="series" data-series="{escape(name)}" fill="none" stroke="{c}" '
                               f'stroke-width="1.8" points="{" ".join(run)}"/>')
                    run = []
                continue
            run.append(f"{f.x(x):.1f},{f.y(min(max(y, y_range[0]), y_range[1])):.1f}")
        ly = f.top + 12 + 15 * i
        out.append(f'<line x1="{f.left + f.w + 10}" y1="{ly}" x2="{f.left + f.w + 28}" y2="{ly}" stroke="{c}" '
                   f'stroke-width="3"/><text x="{f.left + f.w + 32}" y="{ly + 4}" font-size="11">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def timeline(lanes: list[tuple[str, list[dict]]], x_range: tuple[float, float], title: str,
             bands: Iterable[tuple[float, float, str]] = (), width: int = 760, lane_h: int = 22,
             element_id: str = "") -> str:
    """Swimlanes of bars (``{"x0", "x1", "label", "color"}``) and markers (``{"x",
    "label", "color", "shape": "diamond" | "tick"}``) over shaded fault windows.

    Examples:
        >>> svg = timeline([("alerts", [{"x0": 1, "x1": 3, "label": "a"}]), ("commands", [{"x": 2, "label": "c"}])],
        ...                (0, 10), "Alerts")
        >>> svg.count('class="bar"'), svg.count('class="marker diamond"')
        (1, 1)
    """
    height = 28 + 30 + lane_h * max(1, len(lanes))
    f = _Frame(x_range[0], x_range[1], 0, max(1, len(lanes)), width, height, left=200, right=20)
    ident = f' id="{escape(element_id)}"' if element_id else ""
    out = _open(width, height, title, "timeline")
    out[0] = out[0].replace("<svg ", f"<svg{ident} ", 1)
    out += _bands(f, bands) + _x_axis(f)
    for i, (name, items) in enumerate(lanes):
        y = f.top + i * lane_h
        out.append(f'<text x="{f.left - 8}" y="{y + lane_h * 0.65:.1f}" font-size="11" text-anchor="end">'
                   f'{escape(name)}</text>')
        out.append(f'<line x1="{f.left}" y1="{y + lane_h}" x2="{f.left + f.w}" y2="{y + lane_h}" stroke="#f0f0f0"/>')
        for it in items:
            c, tip = it.get("color", "#d62728"), f'<title>{escape(str(it.get("label", "")))}</title>'
            if "x0" in it:
                a, b = f.x(max(it["x0"], f.x0)), f.x(min(it["x1"], f.x1))
                out.append(f'<rect class="bar" x="{a:.1f}" y="{y + 4}" width="{max(2.0, b - a):.1f}" '
                           f'height="{lane_h - 8}" fill="{c}" opacity="0.8">{tip}</rect>')
            else:
                x, mid = f.x(it["x"]), y + lane_h / 2
                if it.get("shape", "diamond") == "diamond":
                    pts = f"{x:.1f},{mid - 6:.1f} {x + 6:.1f},{mid:.1f} {x:.1f},{mid + 6:.1f} {x - 6:.1f},{mid:.1f}"
                    out.append(f'<polygon class="marker diamond" points="{pts}" fill="{c}">{tip}</polygon>')
                else:
                    out.append(f'<line class="marker tick" x1="{x:.1f}" y1="{y + 3}" x2="{x:.1f}" '
                               f'y2="{y + lane_h - 3}" '
                               f'stroke="{c}" stroke-width="2">{tip}</line>')
    out.append("</svg>")
    return "\n".join(out)
