"""A/B: two replays of one recording with different model versions or policies, and a
side-by-side report. The replays run one after the other (each in its own namespace), so
they do not compete for the CPU or GPU and their speeds stay comparable."""

from __future__ import annotations

import dataclasses
import json
import threading
import tomllib
from pathlib import Path
from typing import Any

from streamfuse.config import Settings
from streamfuse.replay.errors import ReplayError
from streamfuse.replay.options import ReplayOptions


def parse_models(items: list[str] | str | None) -> dict[str, str]:
    """``unit=version`` items (repeatable or comma-separated) as a dict.

    Raises:
        ReplayError: an item without ``=``.

    Examples:
        >>> parse_models(["image=v2,audio=v1", "fusion=ume"])
        {'image': 'v2', 'audio': 'v1', 'fusion': 'ume'}
    """
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for item in items or []:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            unit, eq, version = part.partition("=")
            if not eq or not unit.strip() or not version.strip():
                raise ReplayError(f"model choice {part!r} is not UNIT=VERSION (e.g. image=image-3f2a; list versions "
                                  "with `streamfuse models list`)")
            out[unit.strip()] = version.strip()
    return out


def load_policy(path: str | Path) -> dict[str, Any]:
    """Monitor setting overrides from a JSON or TOML file (top level, or a ``[monitor]`` table).

    Raises:
        ReplayError: missing file, unknown extension, or a parse error.
    """
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"policy file {path} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ReplayError(f"policy file {path}: use .json or .toml (MonitorSettings fields, e.g. "
                              '{"kpi_window_ms": 2000, "degradation_margin": 0.1})')
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ReplayError(f"policy file {path} does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise ReplayError(f"policy file {path} must hold a table of MonitorSettings fields")
    return data.get("monitor", data)


def parse_variant(text: str) -> dict[str, Any]:
    """One side of ``--compare``: a policy file (``.json``/``.toml``), a bundle directory,
    ``unit=version[,unit=version]``, or ``live`` (the live active versions and policy).

    Returns:
        ``{"name", "policy" | "bundle" | "models"}``.

    Raises:
        ReplayError: none of those.

    Examples:
        >>> parse_variant("image=v2")
        {'name': 'image=v2', 'models': {'image': 'v2'}}
    """
    path = Path(text)
    if path.suffix in (".json", ".toml") and path.is_file():
        return {"name": path.stem, "policy": load_policy(path)}
    if path.is_dir() and (path / "manifest.json").is_file():
        return {"name": path.name, "bundle": str(path)}
    if "=" in text:
        return {"name": text, "models": parse_models(text)}
    if text in ("live", "current"):
        return {"name": text}
    raise ReplayError(f"--compare side {text!r} is neither a policy file (.json/.toml), a bundle directory, "
                      "UNIT=VERSION[,UNIT=VERSION] nor 'live'")


def compare(recording_dir: str | Path, settings: Settings, a: str | dict[str, Any], b: str | dict[str, Any],
            options: ReplayOptions | None = None, *, stop: threading.Event | None = None) -> dict[str, Any]:
    """Replay the recording twice (A, then B) and report them side by side.

    Args:
        recording_dir / settings / stop: as for :func:`~streamfuse.replay.replayer.replay`.
        a, b: variants (:func:`parse_variant` text, or its dict).
        options: for both replays (speed, time_range, assets, models, policy_overrides...),
            each side's models and policy on top (:func:`side_options`). Its ``report_dir``
            gets ``A/`` and ``B/`` (each a full report), ``compare.html`` and
            ``compare.json``; its ``namespace`` is the base: the sides run in
            ``<namespace>-a`` and ``-b``.

    Returns:
        ``{"a": summary, "b": summary, "names": [..], "differences": {...}}``.
    """
    from streamfuse.replay.replayer import replay
    from streamfuse.replay.report import render_compare

    opts = options if options is not None else ReplayOptions()
    sides = [parse_variant(v) if isinstance(v, str) else dict(v) for v in (a, b)]
    if sides[0]["name"] == sides[1]["name"]:
        sides[0]["name"], sides[1]["name"] = f"A {sides[0]['name']}", f"B {sides[1]['name']}"
    sa, sb = [replay(recording_dir, settings, side_options(opts, tag, side), stop=stop)
              for tag, side in zip(("a", "b"), sides)]
    result = {"names": [s["name"] for s in sides], "a": sa, "b": sb, "differences": differences(sa, sb)}
    if opts.report_dir is not None:
        out_dir = Path(opts.report_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.json").write_text(json.dumps(result, indent=2))
        (out_dir / "compare.html").write_text(render_compare(sa, sb, sides[0]["name"], sides[1]["name"]))
    return result


def side_options(options: ReplayOptions, tag: str, side: dict[str, Any]) -> ReplayOptions:
    """The options of one side of a comparison (``tag`` ``"a"`` or ``"b"``; ``side`` a
    :func:`parse_variant`): its own namespace (``<namespace>-<tag>``), report directory
    (``<report_dir>/<TAG>``) and title; its models and policy on top of those of
    ``options``; its bundle if it names one.

    Examples:
        >>> o = side_options(ReplayOptions(namespace="ab.", report_dir="out", models={"audio": "v1"}), "b",
        ...                  parse_variant("image=v2"))
        >>> o.namespace, str(o.report_dir), o.title, o.models, o.policy_overrides
        ('ab-b', 'out/B', 'replay B: image=v2', {'audio': 'v1', 'image': 'v2'}, {})
    """
    return dataclasses.replace(
        options, namespace=f"{options.namespace.rstrip('.')}-{tag}" if options.namespace else None,
        report_dir=Path(options.report_dir) / tag.upper() if options.report_dir is not None else None,
        title=f"replay {tag.upper()}: {side['name']}", models={**(options.models or {}), **side.get("models", {})},
        policy_overrides={**(options.policy_overrides or {}), **side.get("policy", {})},
        bundle=side.get("bundle", options.bundle))


def differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What differs between two summaries: scores (B − A), alert and command counts,
    false alerts per hour, detection delays."""
    units = sorted(set(a["metrics"]["overall"]) | set(b["metrics"]["overall"]))

    def delta(x: Any, y: Any) -> Any:
        return round(y - x, 4) if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None

    return {
        "scores": {u: {k: delta(a["metrics"]["overall"].get(u, {}).get(k), b["metrics"]["overall"].get(u, {}).get(k))
                       for k in ("top1", "macro_f1")} for u in units},
        "alerts": delta(a["counts"]["alerts"], b["counts"]["alerts"]),
        "commands": delta(a["counts"]["commands"], b["counts"]["commands"]),
        "false_alerts_per_hour": delta(a["false_alerts"]["per_hour"], b["false_alerts"]["per_hour"]),
        "detection_delay_ms": [{"fault": x["fault"], "a": x["delay_ms"], "b": y["delay_ms"]}
                               for x, y in zip(a["fault_detection"], b["fault_detection"])],
        "same_decisions": (a["alerts"], a["commands"]) == (b["alerts"], b["commands"]),
    }
