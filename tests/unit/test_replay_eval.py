"""Evaluation, report, SVG plots and option parsing of record/replay: pure, no broker."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from types import SimpleNamespace

import pytest

from streamfuse.config import MonitorSettings, Settings
from streamfuse.events import Ack, Alert, Command
from streamfuse.replay import svg
from streamfuse.replay.collect import Row
from streamfuse.replay.compare import differences, load_policy, parse_models, parse_variant
from streamfuse.replay.errors import RecordingError, ReplayError
from streamfuse.replay.evaluate import (
    alert_record, command_record, detection, episodes, false_alerts, masked_time, over_time, overall, scores,
)
from streamfuse.replay.namespace import check_isolated, namespace_prefix, policy_overrides
from streamfuse.replay.recorder import _check_annotations, fault_annotations, resolve_topics
from streamfuse.replay.report import render_compare, render_report
from streamfuse.replay.summary import decisions, summarize

T0 = 1_800_000_000_000
FAULT = {"fault": "image:fog@10-20/asset-0", "modality": "image", "kind": "fog", "asset_id": "asset-0",
         "start_ms": T0 + 10_000, "end_ms": T0 + 20_000}


def row(i: int, t_s: float, fused: str, image: str, masked=(), asset="asset-0") -> Row:
    return Row(f"s{i}", asset, "line-0", T0 + int(t_s * 1000), fused, {"image": image, "audio": fused},
               {"image": 0.0 if masked else 0.6, "audio": 0.4 if not masked else 1.0}, tuple(masked), (), "ume",
               {"image": "v1"})


def alert(status: str, at_s: float, kind="degradation", scope="line", scope_id="line-0", start_s=None) -> Alert:
    start = T0 + int((start_s if start_s is not None else at_s) * 1000)
    return Alert("fp1", f"fp1@{start}", status, kind, "critical", "image", scope, scope_id, start,
                 T0 + int(at_s * 1000), summary="line line-0: image accuracy 0.40 < 0.60", value=0.4, threshold=0.6,
                 ends_ms=T0 + int(at_s * 1000) if status == "resolved" else None)


def command(action: str, at_s: float, alert_id: str) -> Command:
    return Command(f"{alert_id}:{action}", action, T0 + int(at_s * 1000), "image", alert_id=alert_id, scope="line",
                   scope_id="line-0")


def synthetic_run():
    """60 predictions over 30 s; image wrong from 10 s to 20 s, masked on line-0 from 14 s to 22 s."""
    truth = ["normal" if i % 4 else "bearing" for i in range(60)]
    rows = [row(i, i * 0.5, truth[i], "bearing" if 20 <= i < 40 else truth[i],
                masked=("image",) if 28 <= i < 44 else ()) for i in range(60)]
    labels = {r.sample_id: ("normal" if i % 4 else "bearing") for i, r in enumerate(rows)}
    a = [alert("firing", 14, start_s=14), alert("resolved", 24, start_s=14), alert("firing", 27, kind="drift",
                                                                                  scope="global", scope_id="")]
    c = [command("mask_modality", 14, a[0].alert_id), command("unmask_modality", 24, a[0].alert_id)]
    acks = [Ack(x.command_id, "host-1", "applied", 1, versions={"image": "v1"}) for x in c]
    return rows, labels, a, c, acks


@pytest.fixture
def run():
    return synthetic_run()


def test_scores_and_overall(run):
    rows, labels, *_ = run
    assert scores([("a", "a"), ("a", "b")]) == {"n": 2, "top1": 0.5, "macro_f1": 0.3333}
    o = overall(rows, labels)
    assert o["fused"] == {"n": 60, "top1": 1.0, "macro_f1": 1.0}
    assert o["image"]["top1"] == round(1 - 15 / 60, 4)  # "bearing" from 10 s to 20 s: wrong 15 times


def test_over_time_bins(run):
    rows, labels, *_ = run
    t = over_time(rows, labels, T0, 5000)
    assert t["t_s"] == [0, 5, 10, 15, 20, 25]
    assert t["n"] == [10] * 6
    assert t["top1"]["fused"] == [1.0] * 6
    assert t["top1"]["image"][0] == 1.0 and t["top1"]["image"][2] < 1.0
    assert t["masked"]["image"][2:4] == [0.2, 1.0] and t["contribution"]["audio"][0] == 0.4


def test_timeline_detection_false_alerts_and_masking(run):
    rows, labels, a, c, acks = run
    end = T0 + 30_000
    alerts = [alert_record(x, T0) for x in a]
    commands = [command_record(x, T0) for x in c]
    eps = episodes(alerts, end)
    assert [(e["kind"], e["start_ms"] - T0, e["end_ms"] - T0, e["open"]) for e in eps] == [
        ("degradation", 14_000, 24_000, False), ("drift", 27_000, 30_000, True)]
    det = detection(eps, commands, [FAULT], {"asset-0": "line-0"}, end, 2000)
    assert det[0]["detected"] and det[0]["delay_ms"] == 4000 and det[0]["command"]["action"] == "mask_modality"
    # another modality's alert does not count as detecting an image fault
    assert not detection(eps, commands, [dict(FAULT, modality="audio")], {}, end, 2000)[0]["detected"]
    fa = false_alerts(eps, [FAULT], 30_000, end, 2000)
    assert fa["alert_ids"] == [eps[1]["alert_id"]] and fa["per_hour"] == 120.0
    masked = masked_time([dict(x, command_id=x["command_id"]) for x in commands],
                         [{"command_id": k.command_id, "status": k.status} for k in acks], rows, end, T0)
    assert masked["image"]["masked_ms"] == 10_000
    assert masked["image"]["intervals"] == [{"scope": "line", "scope_id": "line-0", "from_s": 14.0, "to_s": 24.0}]
    assert masked["image"]["samples_masked_share"] == round(16 / 60, 4)


def test_a_mask_without_an_applied_ack_does_not_count(run):
    rows, _, _, c, _ = run
    commands = [command_record(x, T0) for x in c]
    assert masked_time(commands, [], rows, T0 + 30_000, T0)["image"]["masked_ms"] == 0


class FakeCollector:
    def __init__(self, rows, alerts, commands, acks):
        self.rows = {r.sample_id: r for r in rows}
        self.alert_events, self.command_events, self.ack_events = alerts, commands, acks
        self.counts = Counter({"deadletter": 2, "kpi_snapshots": 40})


def summary_of(run, **kw):
    rows, labels, a, c, acks = run
    return summarize(FakeCollector(rows, a, c, acks), labels, [FAULT], MonitorSettings(kpi_window_ms=2000),
                     {"image": "v1"}, 10.0, {"published": 120, "startup_s": 4.0}, start_ms=T0, **kw)


def test_summary_is_json_and_its_decisions_carry_no_wall_time(run):
    s = summary_of(run)
    json.dumps(s)
    assert s["replay"]["speed_x"] == round(29.5 / 6.0, 2) and s["replay"]["speed_x_with_startup"] == 2.95
    d = decisions(s)
    assert [x["status"] for x in d["alerts"]] == ["firing", "resolved", "firing"]
    assert not any(k in x for x in d["alerts"] + d["commands"] for k in ("worker_id", "wall_ms", "ts_ms"))
    assert s["fault_detection"][0]["delay_ms"] == 4000
    assert s["acks"][0]["worker_id"] == "host-1"


def _svgs(html: str) -> list[ET.Element]:
    out, i = [], 0
    while (i := html.find("<svg", i)) >= 0:
        j = html.index("</svg>", i) + len("</svg>")
        out.append(ET.fromstring(html[i:j]))  # well-formed XML
        i = j
    return out


def test_report_is_self_contained_with_plots_and_alert_timeline(run):
    html = render_report(summary_of(run), "test <report>")
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "test &lt;report&gt;" in html
    plots = _svgs(html)
    assert len(plots) == 5
    timeline = [p for p in plots if p.get("id") == "alert-timeline"]
    assert timeline and len(timeline[0].findall(".//{http://www.w3.org/2000/svg}rect[@class='bar']")) == 3
    assert len(plots[0].findall(".//{http://www.w3.org/2000/svg}rect[@class='fault']")) == 1


def test_compare_report_highlights_differences(run):
    a = summary_of(run)
    b = json.loads(json.dumps(a))
    b["metrics"]["overall"]["image"]["top1"] = 0.9
    b["alerts"] = b["alerts"][:1]
    b["counts"]["alerts"] = 1
    html = render_compare(a, b, "v1", "v2")
    assert 'class="num better"' in html and "Alerts only one side raised" in html
    assert len(_svgs(html)) == 1 + 2 + 8
    d = differences(a, b)
    assert d["scores"]["image"]["top1"] == round(0.9 - a["metrics"]["overall"]["image"]["top1"], 4)
    assert d["alerts"] == -2 and not d["same_decisions"]


def test_svg_helpers_draw_valid_xml():
    chart = ET.fromstring(svg.line_chart([0, 1, 2, 3], {"fused": [1, None, 0.5, 0.6], "x": [0, 0, 0, 0]}, "a & b",
                                         bands=[(1, 2, "fault <1>")]))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(chart.findall(f"{ns}polyline")) == 3
    tl = ET.fromstring(svg.timeline([("a", [{"x0": 0, "x1": 5, "label": "x"}]), ("b", [{"x": 2, "shape": "tick"}])],
                                    (0, 10), "t", element_id="tl"))
    assert tl.get("id") == "tl" and tl.find(f"{ns}line[@class='marker tick']") is not None


def test_model_choices_policies_and_variants(tmp_path):
    assert parse_models("image=v2, audio=v3") == {"image": "v2", "audio": "v3"}
    with pytest.raises(ReplayError, match="UNIT=VERSION"):
        parse_models(["image"])
    (tmp_path / "p.toml").write_text("[monitor]\ndegradation_margin = 0.05\n")
    (tmp_path / "p.json").write_text('{"kpi_window_ms": 3000}')
    assert load_policy(tmp_path / "p.toml") == {"degradation_margin": 0.05}
    assert parse_variant(str(tmp_path / "p.json")) == {"name": "p", "policy": {"kpi_window_ms": 3000}}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ReplayError, match="does not parse"):
        load_policy(tmp_path / "bad.json")
    with pytest.raises(ReplayError, match="neither a policy file"):
        parse_variant("nonsense")
    assert parse_variant("live") == {"name": "live"}


def test_policy_overrides_are_validated():
    base = MonitorSettings()
    assert policy_overrides(base, {"kpi_window_ms": 2500}).kpi_window_ms == 2500
    with pytest.raises(ReplayError, match="unknown monitor setting.*kpi_window_ms"):
        policy_overrides(base, {"window": 1})
    with pytest.raises(ReplayError, match="bad policy value"):
        policy_overrides(base, {"kpi_window_ms": 1})


def test_a_namespace_never_overlaps_the_live_prefix():
    live = Settings(topic_prefix="sf.")
    for bad in ("sf", "sf.", "sf.replay"):
        with pytest.raises(ReplayError, match="overlaps the live topic prefix"):
            check_isolated(live, namespace_prefix(bad))
    check_isolated(live, "s.")  # "sf." does not start with "s."
    assert namespace_prefix(None).startswith("replay-")
    with pytest.raises(ReplayError, match="not a valid topic prefix"):
        namespace_prefix("a b")


def test_recorder_options():
    assert resolve_topics(["outputs"], "sf.")[0] == "predictions"
    with pytest.raises(RecordingError, match="unknown topic 'nope'"):
        resolve_topics(["nope"], "sf.")
    notes = fault_annotations(["audio:mute@30/asset-3", "series:flatline@5"], T0)
    assert notes[0] == {"fault": "audio:mute@30/asset-3", "modality": "audio", "kind": "mute", "asset_id": "asset-3",
                        "start_ms": T0 + 30_000, "end_ms": None}
    assert _check_annotations(notes) == notes
    with pytest.raises(RecordingError, match="start_ms"):
        _check_annotations([{"modality": "image"}])


def test_cli_commands_mount_and_explain_errors(tmp_path):
    import typer
    from typer.testing import CliRunner

    from streamfuse.replay.cli import record, replay

    app = typer.Typer(rich_markup_mode=None)  # as the main app
    app.command()(record)
    app.command()(replay)
    runner = CliRunner()
    assert "--compare" in runner.invoke(app, ["replay", "--help"]).output
    assert "--from-now" in runner.invoke(app, ["record", "--help"]).output
    out = runner.invoke(app, ["replay", str(tmp_path), "--speed", "2", "--max-speed"])
    assert out.exit_code == 2 and "not both" in out.output
    out = runner.invoke(app, ["replay", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "no manifest.json" in out.output
    out = runner.invoke(app, ["record", "--out", str(tmp_path / "r"), "--annotate", "image:fog@1"])
    assert out.exit_code == 2 and "--annotate-start" in out.output


def test_row_of_prediction():
    from streamfuse.events import Prediction
    from streamfuse.replay.collect import row_of

    p = Prediction("s1", "a", 5, ("x", "y"), (0.2, 0.8), "y", "ume", {"image": (0.9, 0.1)}, masked=("image",))
    r = row_of(p)
    assert r.labels == {"image": "x"} and r.fused == "y" and r.masked == ("image",)
    assert SimpleNamespace(**{"sample_id": r.sample_id}).sample_id == "s1"


def test_cli_passes_its_options_to_replay_and_compare_as_one_replay_options(tmp_path, monkeypatch):
    """What `streamfuse replay` builds from its flags, captured before anything connects."""
    import threading

    import typer
    from typer.testing import CliRunner

    from streamfuse.replay import cli, replayer
    from streamfuse.replay.format import RecordingWriter
    from streamfuse.replay.options import ReplayOptions

    RecordingWriter(tmp_path / "rec").close({})
    monkeypatch.setenv("STREAMFUSE_KAFKA_BOOTSTRAP", "127.0.0.1:9")  # a cluster: no embedded broker
    monkeypatch.setattr(cli, "_stop_on_signals", threading.Event)  # leave pytest's Ctrl-C alone
    calls = []

    def captured(recording, settings, options, *, stop):
        calls.append((options, stop))
        raise ReplayError("captured")

    monkeypatch.setattr(replayer, "replay", captured)
    app = typer.Typer(rich_markup_mode=None)
    app.command()(cli.replay)
    app.command("noop")(lambda: None)
    args = ["replay", str(tmp_path / "rec"), "--speed", "2", "--namespace", "ab", "--models", "image=v2",
            "--from", "1", "--assets", "a0, a1", "--keep", "--report", str(tmp_path / "out")]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and "captured" in out.output
    options, stop = calls.pop()
    assert options == ReplayOptions(namespace="ab", speed=2.0, models={"image": "v2"}, report_dir=tmp_path / "out",
                                    time_range=(1.0, None), assets=["a0", "a1"], keep=True, progress=True)
    assert isinstance(stop, threading.Event)
    out = CliRunner().invoke(app, args + ["--compare", "live", "image=v3"])
    assert out.exit_code == 2 and "captured" in out.output
    side_a, _ = calls.pop()
    assert (side_a.namespace, side_a.report_dir, side_a.title, side_a.models, side_a.policy_overrides) == \
        ("ab-a", tmp_path / "out" / "A", "replay A: live", {"image": "v2"}, {})
    out = CliRunner().invoke(app, ["replay", str(tmp_path / "rec"), "--speed", "0"])
    assert out.exit_code == 2 and "speed must be > 0" in out.output and not calls
