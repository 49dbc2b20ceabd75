"""The comparison table of ``streamfuse train --compare`` (test split, Top-1 and macro-F1).

Rows: each modality trained alone (stage 1); each modality's branch inside the jointly
trained model (a linear probe on its frozen features); the joint model's fused output;
UME over the stage-1 models; every learned fusion candidate; and the fusion the bundle
serves. Written as ``compare.json`` and ``compare.md`` in the bundle directory.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from streamfuse.models.config import ModalityConfig
from streamfuse.models.joint import probe_branches, train_joint
from streamfuse.models.splits import Split
from streamfuse.models.stage1 import Progress, TrainOptions
from streamfuse.models.stage2 import Candidate

__all__ = ["render_markdown", "rich_table", "run_comparison", "write_comparison"]
JSON_FILE, MD_FILE = "compare.json", "compare.md"


def _row(name: str, kind: str, scores: Mapping[str, Any], modality: str = "") -> dict[str, Any]:
    return {"model": name, "kind": kind, "modality": modality, "top1": scores.get("top1"),
            "macro_f1": scores.get("macro_f1"), "n": scores.get("n", 0)}


def run_comparison(
    configs: Mapping[str, ModalityConfig], splits: Mapping[str, Split], order: Sequence[str],
    cands: Sequence[Candidate], chosen: Candidate, epochs: int, seed: int, opts: TrainOptions,
    dev: torch.device, progress: Progress | None,
) -> dict[str, Any]:
    """Train the joint model and probes, and build the table from them and the candidates.

    Returns:
        ``{"rows": [...], "chosen": mode, "device", "machine", "date", "joint": {...}}``.
    """
    encoders, _, joint = train_joint(configs, splits, order, epochs, seed + 7919, opts, dev, progress)
    probes = probe_branches(encoders, splits, order, seed + 31, dev, progress)
    base = cands[0]
    rows = [_row(f"{m} alone (stage 1)", "stage1", base.units_test.get(m, {}), m) for m in order]
    rows += [_row(f"{m} branch in joint (linear probe)", "probe", probes[m].get("test", {}), m) for m in order]
    rows.append(_row("joint fused (end to end)", "joint", joint["test"]))
    rows.append(_row("UME (stage-1 models)", "ume", base.test))
    for c in cands[1:]:
        tag = " + UMT" if c.encoders else ""
        rows.append(_row(f"{c.mode}{tag} fusion", "candidate", c.test))
    tag = " + UMT" if chosen.encoders else ""
    rows.append(_row(f"chosen fusion: {chosen.mode}{tag}", "chosen", chosen.test))
    return {
        "split": "test", "rows": rows, "chosen": chosen.mode,
        "val": {c.mode: c.val for c in cands} | {"joint": joint["val"]},
        "joint_training": joint["training"], "probes": probes,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, "
                   f"{torch.get_num_threads()} torch threads",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The table as GitHub markdown.

    Examples:
        >>> print(render_markdown({"rows": [{"model": "UME", "top1": 0.5, "macro_f1": 0.25, "n": 4}]}))
        | model | Top-1 | macro-F1 | n |
        |---|---:|---:|---:|
        | UME | 0.500 | 0.250 | 4 |
    """
    lines = ["| model | Top-1 | macro-F1 | n |", "|---|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {_fmt(r['top1'])} | {_fmt(r['macro_f1'])} | {r['n']} |")
    return "\n".join(lines)


def rich_table(report: Mapping[str, Any]):
    """The table as a :class:`rich.table.Table`."""
    from rich.table import Table

    t = Table(title=f"{report.get('split', 'test')} split: Top-1 and macro-F1")
    for col, justify in (("model", "left"), ("Top-1", "right"), ("macro-F1", "right"), ("n", "right")):
        t.add_column(col, justify=justify)
    for r in report["rows"]:
        style = "bold" if r.get("kind") == "chosen" else None
        t.add_row(r["model"], _fmt(r["top1"]), _fmt(r["macro_f1"]), str(r["n"]), style=style)
    return t


def write_comparison(bundle_dir: str | Path, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``compare.json`` and ``compare.md`` into the bundle directory."""
    bundle_dir = Path(bundle_dir)
    js, md = bundle_dir / JSON_FILE, bundle_dir / MD_FILE
    js.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    head = (f"Comparison on the {report.get('split', 'test')} split "
            f"({report.get('date', '')}, {report.get('device', '')})")
    md.write_text(f"{head}\n\n{render_markdown(report)}\n")
    return js, md
