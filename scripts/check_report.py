"""Open a replay report in headless Chromium and check that its plots and alert timeline render.

Without ``--report`` it makes one first: an embedded broker, a simulated plant with an
injected fault (recorded with its annotation), ``streamfuse replay`` of the recording.
Then Chromium (the Debian package: ``apt-get install chromium``) loads a copy of the
report with a small measuring script appended (the report itself has no scripts) and
the script checks, from the rendered layout:

* every plot is an ``<svg>`` with a non-empty box, the charts have drawn lines;
* the alert timeline (``#alert-timeline``) has the fault band, alert bars and command
  markers with non-zero rendered sizes;

and a screenshot is taken (it must not be blank). Exit status 0 when all checks pass.

    python scripts/check_report.py [--report out/report.html] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
PROBE = """
<script>
(() => {
  const box = e => { const r = e.getBoundingClientRect(); return {w: r.width, h: r.height}; };
  const plots = [...document.querySelectorAll('svg.plot')].map(s => ({
    id: s.id, cls: s.getAttribute('class'), ...box(s),
    lines: [...s.querySelectorAll('polyline.series')].filter(p => box(p).w > 0).length}));
  const tl = document.getElementById('alert-timeline');
  const sized = sel => tl ? [...tl.querySelectorAll(sel)].filter(e => box(e).w > 0 && box(e).h > 0).length : 0;
  const out = {plots, timeline: tl ? {...box(tl), faults: sized('rect.fault'), bars: sized('rect.bar'),
               markers: sized('.marker')} : null, title: document.title};
  const pre = document.createElement('pre'); pre.id = 'report-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def inspect_report(report: Path, out_dir: Path, timeout_s: float = 90) -> dict:
    """Render ``report`` in headless Chromium; returns the measured layout and screenshot path.

    Raises:
        RuntimeError: Chromium is missing or did not produce the measurements.
    """
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium not found: apt-get install -y --no-install-recommends chromium")
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / "report-probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1150,2600"]
        dom = subprocess.run([exe, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                             timeout=timeout_s).stdout
        shot = out_dir / "report.png"
        subprocess.run([exe, *flags, f"--screenshot={shot}", report.resolve().as_uri()], capture_output=True,
                       timeout=timeout_s)
    m = re.search(r'<pre id="report-check">(.*?)</pre>', dom, re.S)
    if m is None:
        raise RuntimeError(f"Chromium did not run the measuring script (DOM of {len(dom)} characters)")
    import html

    result = json.loads(html.unescape(m.group(1)))
    result["screenshot"] = str(shot) if shot.is_file() else None
    return result


def problems(result: dict, min_plots: int = 5) -> list[str]:
    """What is wrong with a rendered report (empty: it is fine)."""
    out = []
    plots = result["plots"]
    if len(plots) < min_plots:
        out.append(f"{len(plots)} plots rendered, expected at least {min_plots}")
    out += [f"plot {i} ({p['cls']}) has an empty box" for i, p in enumerate(plots) if not (p["w"] > 0 and p["h"] > 0)]
    charts = [p for p in plots if "chart" in p["cls"]]
    if not any(p["lines"] for p in charts):
        out.append("no chart drew a line")
    tl = result["timeline"]
    if tl is None:
        out.append("no #alert-timeline in the page")
    else:
        for what in ("faults", "bars", "markers"):
            if not tl[what]:
                out.append(f"the alert timeline rendered no {what}")
    shot = result.get("screenshot")
    if shot:
        from PIL import Image

        with Image.open(shot) as img:
            colours = len(img.convert("RGB").resize((200, 400)).getcolors(maxcolors=80_000) or ())
        if colours < 10:
            out.append(f"the screenshot is blank ({colours} colours)")
    else:
        out.append("Chromium wrote no screenshot")
    return out


def make_report(out_dir: Path, duration_s: float, fault: str) -> Path:
    """Simulate a plant with ``fault``, record it, replay it; returns the report path."""
    from streamfuse.config import Settings
    from streamfuse.models.bootstrap import ensure_models
    from streamfuse.embedded import EmbeddedBroker
    from streamfuse.replay import ReplayOptions, fault_annotations, record, replay
    from streamfuse.sim.faults import parse_fault
    from streamfuse.sim.publish import SimPublisher
    from streamfuse.store import StatusStore, connect
    from streamfuse.topics import ensure_topics

    start = 1_800_000_000_000
    with EmbeddedBroker() as broker:
        tag = uuid.uuid4().hex[:6]
        s = Settings(kafka_bootstrap=broker.bootstrap, broker="tansu", topic_prefix=f"chk{tag}.",
                     redis_prefix=f"streamfuse-check:{tag}:", worker={"device": "cpu", "threads": 1},
                     monitor={"kpi_window_ms": 2000, "label_grace_ms": 4000, "cooldown_ms": 0},
                     sim={"assets": 4, "lines": 2, "rate_hz": 5.0, "label_delay_ms": 1000})
        try:
            ensure_models(s)
            ensure_topics(s)
            faults = (parse_fault(fault),)
            SimPublisher(s, faults, start_ms=start, speed=None, run_id="check").run(duration_s)
            record(s, out_dir / "recording", annotations=fault_annotations(faults, start),
                   meta={"sim": s.sim.model_dump()})
            replay(out_dir / "recording", s, ReplayOptions(report_dir=out_dir / "report", title=f"report check: {fault}"))
        finally:
            StatusStore(connect(s), s.redis_prefix).clear()
    return out_dir / "report" / "report.html"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, help="an existing report.html (default: make one)")
    ap.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--fault", default="image:fog@10-25")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="check-report-"))
    t0 = time.monotonic()
    report = args.report or make_report(out, args.duration, args.fault)
    result = inspect_report(report, out)
    bad = problems(result)
    t = result["timeline"] or {}
    print(f"report {report}: {len(result['plots'])} plots, {sum(p['lines'] for p in result['plots'])} lines; alert "
          f"timeline {t.get('w', 0):.0f}x{t.get('h', 0):.0f} px with {t.get('faults', 0)} fault band(s), "
          f"{t.get('bars', 0)} alert bar(s), {t.get('markers', 0)} marker(s); screenshot {result['screenshot']} "
          f"({time.monotonic() - t0:.0f} s)")
    for p in bad:
        print(f"FAIL: {p}")
    print("OK" if not bad else "FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
