"""Detection delay, false alarms and fused accuracy under every sensor fault: streamfuse's
label-free sequential detectors against river's ADWIN, Page-Hinkley and HDDM_W on the same
per-sample evidence, tuned in the same run to the same measured false-alarm rate.

The plant: the demo plant (4 assets on 2 lines, 2 samples/s each) and, with
``--dataset DIR --dataset-models BUNDLE``, a real labelled dataset streamed as in
``simulate --dataset``. Every fault kind of ``streamfuse/sim/faults.py`` at two severities
(1.0: every reading; 0.5: every other reading on average, an intermittent fault) and two
onsets (30 s after a cold start; after 2 h of clean stream), on every asset at once.

How it runs (measured, not assumed, that the full pipeline is too slow for this here:
the replay engine reaches about 25x real time on this 2-core machine, so 2 h of clean
stream per configuration would take 40 x 5 min): the served bundle's outputs are computed
once per fault kind on the same samples (``bench/detection_pools.py``), and streams are
drawn from them (the demo plant's state chain picks the class of each sample) and driven
through the pure :class:`~streamfuse.monitor.core.MonitorCore` exactly as the monitor runs
it (labels after 2 s, its mask commands applied to the following samples, the fusion
recomputed without the masked modality). The evidence streams are the monitor's own.
The 2 h clean prefix is run once and each late-onset configuration continues a copy of
its state (monitor and river detectors), so each of them follows 2 h of clean stream.

    python bench/detection.py --json out/detection.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from detection_pools import Pool, conditions, dataset_pools, sim_pools  # noqa: E402
from report import emit, machine  # noqa: E402

from streamfuse.config import MonitorSettings  # noqa: E402
from streamfuse.events import Label, Prediction  # noqa: E402
from streamfuse.monitor.core import MonitorCore  # noqa: E402
from streamfuse.monitor.evidence import estimate_errors  # noqa: E402

ASSETS, LINES, PERIOD_MS, LABEL_DELAY_MS = 4, 2, 500, 2000
SEVERITIES = (1.0, 0.5)
FAULT_S = 60
FLOOR_KINDS = (("image", "fog"), ("audio", "noise"), ("series", "flatline"))
GRIDS = {  # most sensitive first
    "ADWIN": ("delta", [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 2e-3, 1e-4, 1e-6, 1e-9, 1e-12]),
    "PageHinkley": ("threshold", [1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 130, 200]),
    "HDDM_W": ("drift_confidence", [0.1, 0.01, 1e-3, 1e-5, 1e-8, 1e-12]),
}


def river_detector(name: str, value: float):
    from river import drift

    if name == "ADWIN":
        return drift.ADWIN(delta=value)
    if name == "PageHinkley":
        return drift.PageHinkley(threshold=value, mode="up", delta=0.005)
    return drift.binary.HDDMW(drift_confidence=value, warning_confidence=min(0.5, value * 5))


@dataclass
class Run:
    """One stream through the monitor, the simulated workers' masks and river's detectors."""

    core: MonitorCore
    pools: dict
    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    mode: str
    rivers: dict[tuple[str, float, str, str], object]  # (name, param, line, modality) -> detector
    rng: np.random.Generator
    chain: object  # the demo plant (its state chain), or None: rows drawn at random
    masks: set = field(default_factory=set)
    labels: list = field(default_factory=list)
    alerts: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    kpis: list = field(default_factory=list)
    river_hits: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # (ts, line, fused right, ume right, quality right, faulty)
    seq: int = 0
    by_class: dict = field(default_factory=dict)

    def run(self, start_ms: int, end_ms: int, fault: tuple[str, str] | None = None, onset_ms: int = 0,
            severity: float = 1.0, record: bool = True) -> None:
        for ts in range(start_ms, end_ms, PERIOD_MS):
            for a in range(ASSETS):
                cls = self._class(a, ts)
                i = int(self.rng.choice(self.by_class[cls]))
                faulty = fault is not None and ts >= onset_ms and self.rng.random() < severity
                self._sample(ts, a, self.pools[fault] if faulty else self.pools["clean"], i, faulty, record)

    def _class(self, a: int, ts: int) -> int:
        if self.chain is None:
            return int(self.rng.integers(len(self.by_class)))
        return self.classes.index(self.chain.state_at(a, ts))

    def _sample(self, ts: int, a: int, pool: Pool, i: int, faulty: bool, record: bool) -> None:
        line, asset = f"line-{a % LINES}", f"asset-{a}"
        while self.labels and self.labels[0].ts_ms <= ts - LABEL_DELAY_MS:
            self.core.on_label(self.labels.pop(0))
        masked = {m for m in self.modalities if (m, "global", "") in self.masks or (m, "line", line) in self.masks
                  or (m, "asset", asset) in self.masks}
        present = pool.present[i]
        use = tuple(bool(p) and m not in masked for m, p in zip(self.modalities, present))
        if not any(use):
            use = tuple(bool(p) for p in present)
        served = pool.fused[self.mode][use][i]
        y = int(served.argmax())
        mods = {m: tuple(pool.probs[i, j].tolist()) for j, m in enumerate(self.modalities) if present[j]}
        sid = f"b{self.seq}"
        self.seq += 1
        pred = Prediction(sid, asset, ts, self.classes, tuple(served.tolist()), self.classes[y], self.mode, mods,
                          line_id=line, missing=tuple(m for j, m in enumerate(self.modalities) if not present[j]),
                          masked=tuple(m for m in masked if m in mods), worker_id="bench",
                          signal_std={m: float(pool.signal_std[i, j]) for j, m in enumerate(self.modalities)
                                      if present[j]})
        truth = int(pool.truth[i])
        self.labels.append(Label(sid, asset, ts, self.classes[truth], line_id=line))
        out = self.core.on_prediction(pred, f"p{a % 3}")
        for c in out.commands:
            key = (c.modality, c.scope, c.scope_id)
            if c.action == "mask_modality":
                self.masks.add(key)
            elif c.action == "unmask_modality":
                self.masks.discard(key)
        if record:
            self.alerts += out.alerts
            self.commands += out.commands
            self.kpis += [k for k in out.kpis if k.scope != "asset"]
            self.rows.append((ts, line, y == truth, int(pool.fused["ume"][use][i].argmax()) == truth,
                              int(pool.fused["quality"][use][i].argmax()) == truth, faulty))
        ev = pool.evidence[i]
        for (name, value, dline, m), det in self.rivers.items():
            if dline != line or m not in ev or ev[m][0] is None:
                continue
            x = 1.0 - ev[m][0]
            det.update(x > 0.5 if name == "HDDM_W" else x)
            if det.drift_detected:
                self.river_hits.setdefault((name, value, line, m), []).append(ts)


def new_run(bundle, pools, settings: MonitorSettings, mode: str, rivers: dict, seed: int, sim: bool) -> Run:
    from streamfuse.sim.plant import Plant, PlantConfig

    chain = Plant(PlantConfig(assets=ASSETS, lines=LINES, seed=seed), run_id="chain") if sim else None
    truth = pools["clean"].truth
    by_class = {c: np.flatnonzero(truth == c) for c in range(len(bundle.classes)) if (truth == c).any()}
    if not sim:
        by_class = {k: v for k, v in enumerate(by_class.values())}
    run = Run(MonitorCore(dict(bundle.baselines), settings), pools, bundle.classes, bundle.modalities, mode,
              rivers, np.random.default_rng(seed), chain)
    run.by_class = by_class
    return run


def all_rivers(modalities, grids=GRIDS) -> dict:
    return {(n, v, f"line-{k}", m): river_detector(n, v) for n, (_, vals) in grids.items() for v in vals
            for k in range(LINES) for m in modalities}


def first_per_line(times: dict[str, list[int]], onset: int) -> dict[str, float | None]:
    return {f"line-{k}": next(((t - onset) / 1000 for t in sorted(times.get(f"line-{k}", [])) if t >= onset), None)
            for k in range(LINES)}


def our_delays(run: Run, modality: str, onset: int) -> tuple[dict, dict]:
    alerts: dict[str, list[int]] = {}
    for a in run.alerts:
        if a.status == "firing" and a.modality == modality:
            lines = [a.scope_id] if a.scope == "line" else [f"line-{k}" for k in range(LINES)] if a.scope == "global" \
                else [f"line-{int(a.scope_id.split('-')[1]) % LINES}"]
            for ln in lines:
                alerts.setdefault(ln, []).append(a.event_ms)
    masks: dict[str, list[int]] = {}
    per_asset: dict[str, int] = {}  # a sensor fault masks its asset: a line is masked once all of its assets are
    for c in run.commands:
        if c.action == "mask_modality" and c.modality == modality and c.scope in ("line", "global"):
            for ln in ([c.scope_id] if c.scope == "line" else [f"line-{k}" for k in range(LINES)]):
                masks.setdefault(ln, []).append(c.issued_ms)
        elif c.action == "mask_modality" and c.modality == modality and c.scope == "asset" and c.issued_ms >= onset:
            per_asset.setdefault(c.scope_id, c.issued_ms)
    for k in range(LINES):
        assets = [f"asset-{a}" for a in range(ASSETS) if a % LINES == k]
        if all(a in per_asset for a in assets):
            masks.setdefault(f"line-{k}", []).append(max(per_asset[a] for a in assets))
    return first_per_line(alerts, onset), first_per_line(masks, onset)


def accuracy_report(run: Run, pools, fault, onset: int, end: int, mode: str, modalities) -> dict:
    rows = [r for r in run.rows if onset <= r[0] < end]
    col = {"quality": 4, "ume": 3}[mode]
    acc = statistics.fmean(r[col] for r in rows) if rows else None
    acc_ume = statistics.fmean(r[3] for r in rows) if rows else None
    # the best subset of healthy modalities, on the same fault segment's samples (no masks needed)
    healthy = [j for j, m in enumerate(modalities) if m != fault[0]]
    best = None
    pool, clean = pools[fault], pools["clean"]
    for bits in range(1, 2 ** len(healthy)):
        use = tuple(j in [healthy[b] for b in range(len(healthy)) if bits >> b & 1] for j in range(len(modalities)))
        right = [int(pool.fused[mode][use][i].argmax()) == int(pool.truth[i]) for i in range(len(pool.truth))]
        score = statistics.fmean(right)
        best = score if best is None else max(best, score)
    del clean
    bins: dict[int, list[bool]] = {}
    for r in rows:
        bins.setdefault((r[0] - onset) // 1000, []).append(r[col])
    loss = sum(max(0.0, best - statistics.fmean(v)) for v in bins.values())
    roll, back = sorted(bins), None
    for k, b in enumerate(roll):
        tail = [x for bb in roll[k:k + 5] for x in bins[bb]]
        if len(roll[k:]) >= 5 and statistics.fmean(tail) >= best - 0.03:
            back = float(b)
            break
    return {"fused_top1": acc, "fused_top1_ume": acc_ume, "best_healthy_subset_top1": best,
            "loss_area_acc_s": round(loss, 3), "recovered_after_s": back}


def summarize(delays: list[float | None]) -> dict:
    got = sorted(d for d in delays if d is not None)
    if not got:
        return {"n": len(delays), "detected": 0, "median_s": None, "p90_s": None}
    return {"n": len(delays), "detected": len(got), "median_s": round(statistics.median(got), 3),
            "p90_s": round(got[min(len(got) - 1, int(0.9 * len(got)))], 3),
            "median_samples": round(statistics.median(got) * ASSETS / LINES * 1000 / PERIOD_MS, 1)}


def tune(prefix: Run, target: int) -> dict[str, float]:
    """Per river detector, the most sensitive setting whose false alarms on the clean
    prefix are at most ``target`` (ours), else the one with the fewest."""
    chosen = {}
    for name, (_, values) in GRIDS.items():
        counts = [(sum(len(prefix.river_hits.get((name, v, f"line-{k}", m), [])) for k in range(LINES)
                       for m in prefix.modalities), v) for v in values]
        ok = [v for c, v in counts if c <= target]
        chosen[name] = ok[0] if ok else min(counts)[1]
    return chosen


def evaluate(bundle, pools, args, sim: bool) -> dict:
    settings = MonitorSettings(false_alarms_per_day=args.budget)
    mode = args.fusion
    prefix_ms = int(args.clean_hours * 3600_000)
    t0 = time.perf_counter()
    prefix = new_run(bundle, pools, settings, mode, all_rivers(bundle.modalities), args.seed, sim)
    prefix.run(0, prefix_ms, record=True)
    ours_fa = [a for a in prefix.alerts if a.status == "firing"]
    chosen = tune(prefix, len(ours_fa))
    fa = {"streamfuse": len(ours_fa)} | {
        n: sum(len(prefix.river_hits.get((n, v, f"line-{k}", m), [])) for k in range(LINES) for m in bundle.modalities)
        for n, v in chosen.items()}
    print(f"clean prefix: {args.clean_hours} h in {time.perf_counter() - t0:.0f} s; false alarms {fa}; "
          f"river settings {chosen}", flush=True)
    prefix.rivers = {k: d for k, d in prefix.rivers.items() if chosen.get(k[0]) == k[1]}
    prefix.alerts, prefix.commands, prefix.kpis, prefix.rows, prefix.river_hits = [], [], [], [], {}
    configs = []
    for fault in conditions(bundle.modalities):
        for severity in SEVERITIES:
            for onset_name in ("cold_30s", "after_clean"):
                if onset_name == "cold_30s":
                    run = new_run(bundle, pools, settings, mode, {k: river_detector(k[0], k[1])
                                                                   for k in prefix.rivers}, args.seed + 1, sim)
                    onset, start = 30_000, 0
                else:
                    run, onset, start = copy.deepcopy(prefix), prefix_ms, prefix_ms
                end = onset + FAULT_S * 1000
                run.run(start, end, fault, onset, severity)
                configs.append(_config(run, pools, fault, severity, onset_name, onset, end, mode, bundle, chosen))
        print(f"  {fault[0]}:{fault[1]} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"false_alarms_clean": fa, "clean_hours": args.clean_hours, "river_settings": chosen,
            "configs": configs, **_aggregate(configs, fa, args.clean_hours)}


def _config(run: Run, pools, fault, severity, onset_name, onset, end, mode, bundle, chosen) -> dict:
    alert, mask = our_delays(run, fault[0], onset)
    river = {n: first_per_line({f"line-{k}": run.river_hits.get((n, v, f"line-{k}", fault[0]), [])
                                for k in range(LINES)}, onset) for n, v in chosen.items()}
    false = [a.summary for a in run.alerts if a.status == "firing" and a.event_ms < onset]
    wrong = [a.summary for a in run.alerts if a.status == "firing" and a.event_ms >= onset
             and a.modality not in (fault[0], "") and a.kind not in ("drift", "dominance", "fusion_regression")]
    windows = [(k.modality, k.est_accuracy, k.accuracy, k.n_labelled) for k in run.kpis
               if k.window_start_ms >= onset - 30_000]
    return {"fault": f"{fault[0]}:{fault[1]}", "severity": severity, "onset": onset_name,
            "first_alert_s": alert, "masked_s": mask, "river_first_s": river, "false_alerts_before": false,
            "other_modality_alerts": wrong, **accuracy_report(run, pools, fault, onset, end, mode, bundle.modalities),
            "estimate": estimate_errors(windows)}


def _aggregate(configs: list[dict], fa: dict, hours: float) -> dict:
    per_detector = {"streamfuse": summarize([d for c in configs for d in c["first_alert_s"].values()])}
    for name in GRIDS:
        per_detector[name] = summarize([d for c in configs for d in c["river_first_s"][name].values()])
    for name, s in per_detector.items():
        s["false_alarms_per_hour"] = round(fa[name] / hours, 3)
    floor = [c for c in configs if tuple(c["fault"].split(":")) in FLOOR_KINDS and c["severity"] == 1.0]
    best_river = min((s["median_s"] for n, s in per_detector.items() if n != "streamfuse" and s["median_s"]),
                     default=None)
    ours = per_detector["streamfuse"]["median_s"]
    errs = sorted(c["estimate"]["median_abs_error"] for c in configs if c["estimate"]["median_abs_error"] is not None)
    return {
        "per_detector": per_detector,
        "ratio_median_delay_vs_best_river": round(ours / best_river, 3) if ours and best_river else None,
        "floors": {
            "first_alert_every_line_s": {c["fault"] + "@" + c["onset"]: c["first_alert_s"] for c in floor},
            "masked_every_line_s": {c["fault"] + "@" + c["onset"]: c["masked_s"] for c in floor},
            "fused_vs_best_healthy_subset": {c["fault"] + "@" + c["onset"]: [c["fused_top1"],
                                                                           c["best_healthy_subset_top1"]]
                                             for c in floor},
            "estimate_median_abs_error_median_over_configs": statistics.median(errs) if errs else None,
        },
    }


def load_bundle_for(args) -> object:
    from streamfuse.config import Settings
    from streamfuse.models.bootstrap import ensure_demo_bundle
    from streamfuse.models.bundle_io import load_bundle

    settings = Settings(model_dir=args.models)
    path = ensure_demo_bundle(settings) if args.bundle is None else Path(args.bundle)
    bundle = load_bundle(path)
    if bundle.calibration is None:
        raise SystemExit(f"{path} has no validation calibration: retrain it with this version "
                         "(streamfuse train ..., or delete the cached demo bundle)")
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path(".cache/streamfuse/models"), help="model dir (demo bundle)")
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle dir instead of the demo bundle")
    ap.add_argument("--dataset", type=Path, default=None, help="a metadata.csv dataset streamed as the plant too")
    ap.add_argument("--dataset-models", type=Path, default=None, help="the bundle trained on --dataset")
    ap.add_argument("--clean-hours", type=float, default=2.0)
    ap.add_argument("--pool", type=int, default=600, help="samples per fault kind (demo plant)")
    ap.add_argument("--budget", type=float, default=1.0, help="false alarms per day")
    ap.add_argument("--fusion", default="quality", choices=("quality", "ume"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bundle = load_bundle_for(args)
    pools = sim_pools(bundle, args.pool, seed=101)
    print(f"demo plant pools: {len(pools)} conditions x {args.pool} samples in {time.perf_counter() - t0:.0f} s")
    result = {"demo_plant": evaluate(bundle, pools, args, sim=True)}
    if args.dataset is not None and args.dataset_models is not None:
        from streamfuse.models.bundle_io import load_bundle

        real = load_bundle(args.dataset_models)
        result["dataset"] = {"path": str(args.dataset), **evaluate(real, dataset_pools(real, args.dataset, 7),
                                                                   args, sim=False)}
    result.update(**machine(), wall_s=round(time.perf_counter() - t0),
                  settings={"budget_per_day": args.budget, "fusion": args.fusion, "pool": args.pool})
    for plant in ("demo_plant", "dataset"):
        if plant in result:
            r = result[plant]
            print(f"\n{plant}: median delay ratio streamfuse / best river = {r['ratio_median_delay_vs_best_river']}")
            for name, s in r["per_detector"].items():
                print(f"  {name:12s} median {s['median_s']} s  p90 {s['p90_s']} s  detected {s['detected']}/{s['n']}"
                      f"  false alarms/h {s['false_alarms_per_hour']}")
    emit(result, args.json, show=False)


if __name__ == "__main__":
    main()
