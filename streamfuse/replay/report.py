"""The replay report: one self-contained HTML page (inline CSS and SVG, no scripts, no
network), from a summary (:mod:`.summary`), and the side-by-side A/B page."""

from __future__ import annotations

from html import escape
from typing import Any

from streamfuse.replay import svg

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px}.muted{color:#777;font-size:12px}
td.better{background:#d4edda}td.worse{background:#f8d7da}td.changed{background:#fff3cd}
figure{margin:10px 0}
"""
ACTION_COLORS = {"mask_modality": "#d62728", "unmask_modality": "#2ca02c", "rollback_model": "#9467bd",
                 "activate_model": "#8c564b", "rollback_fusion": "#e377c2", "set_fusion_mode": "#17becf"}
KIND_COLORS = {"degradation": "#d62728", "sensor_fault": "#ff7f0e", "drift": "#bcbd22", "dominance": "#9467bd",
               "fusion_regression": "#e377c2", "command_unacked": "#8c564b"}


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else escape(str(x))


def _table(head: list[str], rows: list[list[Any]], classes: list[list[str]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            cls = ("num " if isinstance(v, (int, float)) or v is None else "") + (classes[i][j] if classes else "")
            cells.append(f'<td class="{cls.strip()}">{_num(v)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _bands(s: dict[str, Any]) -> list[tuple[float, float, str]]:
    """Annotated fault windows as (from s, to s, label); an open-ended one runs to the end."""
    t0 = s["start_ms"]
    return [((a["start_ms"] - t0) / 1000, ((a["end_ms"] if a.get("end_ms") is not None else s["end_ms"]) - t0) / 1000,
             a.get("fault") or a["modality"]) for a in s.get("annotations", [])]


def _x_range(s: dict[str, Any]) -> tuple[float, float]:
    return 0.0, max(1.0, (s["end_ms"] - s["start_ms"]) / 1000)


def plots(s: dict[str, Any], label: str = "") -> list[str]:
    """The over-time charts of one summary, as SVG strings."""
    t = s["metrics"]["over_time"]
    xs = [x + t["bin_ms"] / 2000 for x in t["t_s"]]
    bands, xr, tag = _bands(s), _x_range(s), f" ({label})" if label else ""
    return [svg.line_chart(xs, t["top1"], f"Top-1 over time{tag}", bands=bands, x_range=xr),
            svg.line_chart(xs, t["macro_f1"], f"Macro-F1 over time{tag}", bands=bands, x_range=xr),
            svg.line_chart(xs, t["contribution"], f"Contribution share over time{tag}", bands=bands, x_range=xr),
            svg.line_chart(xs, t["masked"], f"Share of samples with the modality masked{tag}", bands=bands,
                           x_range=xr)]


def alert_timeline(s: dict[str, Any], element_id: str = "alert-timeline", label: str = "") -> str:
    """Alerts (a lane per kind, modality and scope), commands, acks and recorded alerts
    over the annotated fault windows."""
    t0 = s["start_ms"]
    lanes: list[tuple[str, list[dict]]] = [("faults", [
        {"x0": (a["start_ms"] - t0) / 1000, "x1": ((a["end_ms"] or s["end_ms"]) - t0) / 1000,
         "label": a.get("fault") or a["modality"], "color": "#f5a3ab"} for a in s.get("annotations", [])])]
    groups: dict[str, list[dict]] = {}
    for e in s["episodes"]:
        where = "fleet" if e["scope"] == "global" else e["scope_id"]
        groups.setdefault(f'{e["kind"]} {e["modality"]} {where}', []).append(
            {"x0": (e["start_ms"] - t0) / 1000, "x1": (e["end_ms"] - t0) / 1000, "color": KIND_COLORS.get(e["kind"]),
             "label": f'{e["scope"]} {e["scope_id"]}: {e["summary"]}'})
    lanes += sorted(groups.items())
    issued = {c["command_id"]: c for c in s["commands"]}
    lanes.append(("commands", [{"x": c["t_s"], "label": f'{c["action"]} {c["modality"] or ""} {c["scope"]} '
                                f'{c["scope_id"]}', "color": ACTION_COLORS.get(c["action"], "#333")}
                               for c in s["commands"]]))
    lanes.append(("acks", [{"x": issued[a["command_id"]]["t_s"], "shape": "tick", "color": "#2ca02c" if
                            a["status"] == "applied" else "#d62728", "label": f'{a["status"]} {a["command_id"]}'}
                           for a in s["acks"] if a["command_id"] in issued]))
    if "recorded" in s:
        lanes.append(("recorded alerts", [{"x": a["t_s"], "label": f'{a["status"]} {a["kind"]} {a["modality"]}',
                                           "color": "#555"} for a in s["recorded"]["alerts"]]))
    tag = f" ({label})" if label else ""
    return svg.timeline(lanes, _x_range(s), f"Alerts, commands and acks against the fault windows{tag}",
                        bands=_bands(s), element_id=element_id)


def _sections(s: dict[str, Any]) -> list[str]:
    units = s["metrics"]["overall"]
    body = ["<h2>Scores over the whole run</h2>",
            _table(["unit", "Top-1", "macro-F1", "labelled"],
                   [[u, v["top1"], v["macro_f1"], v["n"]] for u, v in units.items()])]
    body += ["<h2>Over time</h2>"] + [f"<figure>{p}</figure>" for p in plots(s)]
    body += ["<h2>Alert timeline</h2>", f"<figure>{alert_timeline(s)}</figure>"]
    det = s["fault_detection"]
    body += ["<h2>Fault detection</h2>", _table(
        ["fault", "detected", "delay (s)", "alert", "first command", "command delay (s)"],
        [[d["fault"], "yes" if d["detected"] else "no", None if d["delay_ms"] is None else d["delay_ms"] / 1000,
          d["alert"] and f'{d["alert"]["kind"]} {d["alert"]["scope"]} {d["alert"]["scope_id"]}',
          d["command"] and d["command"]["action"],
          d["command"] and d["command"]["delay_ms"] / 1000] for d in det]) if det else
        '<p class="muted">No annotated faults in this recording.</p>']
    fa = s["false_alerts"]
    body += ["<h2>False alerts</h2>", f'<p>{fa["count"]} alert(s) overlap no fault window (± '
             f'{fa["tolerance_ms"] / 1000:g} s): <b>{_num(fa["per_hour"], 2)}</b> per hour of event time. '
             f'{escape(", ".join(fa["alert_ids"]))}</p>']
    body += ["<h2>Masked modalities</h2>", _table(
        ["modality", "masked (s, summed over scopes)", "share of samples", "intervals"],
        [[m, v["masked_ms"] / 1000, v["samples_masked_share"],
          "; ".join(f'{i["scope"]} {i["scope_id"]} {i["from_s"]}–{i["to_s"]} s' for i in v["intervals"])]
         for m, v in s["masked"].items()])]
    body += ["<h2>Alerts</h2>", _table(["t (s)", "status", "kind", "modality", "scope", "summary"],
                                       [[a["t_s"], a["status"], a["kind"], a["modality"],
                                         f'{a["scope"]} {a["scope_id"]}', a["summary"]] for a in s["alerts"]])]
    body += ["<h2>Commands</h2>", _table(["t (s)", "action", "modality", "scope", "version / mode", "acks"],
                                         [[c["t_s"], c["action"], c["modality"], f'{c["scope"]} {c["scope_id"]}',
                                           c["version"] or c["fusion_mode"],
                                           ", ".join(a["status"] for a in s["acks"]
                                                     if a["command_id"] == c["command_id"])]
                                          for c in s["commands"]])]
    return body


def _header(s: dict[str, Any]) -> list[str]:
    r, c = s["replay"], s["counts"]
    cards = [("predictions", c["predictions"]), ("labelled", c["labelled"]), ("alerts", c["alerts"]),
             ("commands", c["commands"]), ("false alerts / h", s["false_alerts"]["per_hour"]),
             ("event time (s)", r["event_s"]), ("replay speed", f'{r["speed_x"]}x' if r["speed_x"] else None)]
    return ['<div class="cards">' + "".join(f'<div class="card"><b>{_num(v, 2)}</b>{escape(k)}</div>'
                                            for k, v in cards) + "</div>",
            f'<p class="muted">recording {escape(str(r.get("recording", "")))} · namespace '
            f'{escape(str(r.get("namespace", "")))} · models '
            f'{escape(", ".join(f"{u}={v}" for u, v in s["models"].items()))}</p>']


def render_report(s: dict[str, Any], title: str | None = None) -> str:
    """The HTML report of one replay summary (see :mod:`streamfuse.replay.summary`)."""
    title = title or "streamfuse replay report"
    return _page(title, [f"<h1>{escape(title)}</h1>", *_header(s), *_sections(s)])


def _cmp_row(name: str, a: Any, b: Any, higher_is_better: bool | None) -> tuple[list[Any], list[str]]:
    delta = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
    cls = ""
    if a != b:
        cls = "changed"
        if delta is not None and higher_is_better is not None and delta != 0:
            cls = "better" if (delta > 0) == higher_is_better else "worse"
    return [name, a, b, delta if delta is None else round(delta, 4)], ["", "", cls, cls]


def render_compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Side by side: scores, detection, false alerts, masking and decisions of two
    replays of one recording; cells that differ are highlighted (green: B better, red:
    B worse, yellow: different)."""
    rows, cls = [], []

    def add(name: str, va: Any, vb: Any, better: bool | None) -> None:
        r, c = _cmp_row(name, va, vb, better)
        rows.append(r)
        cls.append(c)

    for u in sorted(set(a["metrics"]["overall"]) | set(b["metrics"]["overall"])):
        for k in ("top1", "macro_f1"):
            add(f"{u} {k}", a["metrics"]["overall"].get(u, {}).get(k), b["metrics"]["overall"].get(u, {}).get(k), True)
    add("alerts", a["counts"]["alerts"], b["counts"]["alerts"], None)
    add("commands", a["counts"]["commands"], b["counts"]["commands"], None)
    add("false alerts / hour", a["false_alerts"]["per_hour"], b["false_alerts"]["per_hour"], False)
    for da, db in zip(a["fault_detection"], b["fault_detection"]):
        add(f"delay (s): {da['fault']}", None if da["delay_ms"] is None else da["delay_ms"] / 1000,
            None if db["delay_ms"] is None else db["delay_ms"] / 1000, False)
    for m in sorted(set(a["masked"]) | set(b["masked"])):
        add(f"masked (s): {m}", a["masked"].get(m, {}).get("masked_ms", 0) / 1000,
            b["masked"].get(m, {}).get("masked_ms", 0) / 1000, None)
    for u in sorted(set(a["models"]) | set(b["models"])):
        add(f"model {u}", a["models"].get(u), b["models"].get(u), None)

    def key(x: dict[str, Any]) -> tuple:
        return (x["status"], x["kind"], x["modality"], x["scope"], x["scope_id"], x["event_ms"])

    only_a = sorted(set(map(key, a["alerts"])) - set(map(key, b["alerts"])), key=lambda k: k[-1])
    only_b = sorted(set(map(key, b["alerts"])) - set(map(key, a["alerts"])), key=lambda k: k[-1])
    t0 = a["start_ms"]
    diff = [[name_a if k in only_a else name_b, round((k[-1] - t0) / 1000, 3), k[0], k[1], k[2], f"{k[3]} {k[4]}"]
            for k in sorted(only_a + only_b, key=lambda k: k[-1])]
    ta, tb = a["metrics"]["over_time"], b["metrics"]["over_time"]
    xs = [x + ta["bin_ms"] / 2000 for x in ta["t_s"]]
    overlay = svg.line_chart(xs, {name_a: ta["top1"].get("fused", []), name_b: tb["top1"].get("fused", [])},
                             f"Fused Top-1 over time: {name_a} vs {name_b}", bands=_bands(a), x_range=_x_range(a))
    title = f"streamfuse A/B replay: {name_a} vs {name_b}"
    body = [f"<h1>{escape(title)}</h1>", "<h2>Side by side</h2>",
            _table(["", name_a, name_b, f"{name_b} − {name_a}"], rows, cls),
            f"<figure>{overlay}</figure>", "<h2>Alert timelines</h2>",
            f"<figure>{alert_timeline(a, 'alert-timeline-a', name_a)}</figure>",
            f"<figure>{alert_timeline(b, 'alert-timeline-b', name_b)}</figure>",
            "<h2>Alerts only one side raised</h2>",
            _table(["only in", "t (s)", "status", "kind", "modality", "scope"], diff) if diff else
            "<p>Both raised the same alerts at the same event times.</p>"]
    body += ["<h2>Over time</h2>"] + [f"<figure>{p}</figure>" for p in plots(a, name_a) + plots(b, name_b)]
    return _page(title, body)
