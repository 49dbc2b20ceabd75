"""The signal-spread range check on unseen healthy readings and on every fault kind: how
often a healthy reading leaves the range its bundle fitted on the validation split (the
false-alarm side; reported as a ratio to the ``p_out`` the evidence assumes), and how
often a faulty one does (the detection side).

The demo plant, and any real ``metadata.csv`` dataset with the bundle trained on it
(``--dataset DIR --dataset-models BUNDLE``, repeatable): its train and test splits are
the unseen healthy readings (the range was fitted on its validation split), and every
fault kind of ``streamfuse/sim/faults.py`` is applied to its test rows.

    python bench/spread_range.py --dataset data/digits --dataset-models models/digits --json out/spread.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from detection_pools import conditions, dataset_pools, encode_pool, sim_pools  # noqa: E402
from report import emit, machine  # noqa: E402

from streamfuse.monitor.spread import SpreadRange, ranges_from_baselines  # noqa: E402


def out_share(pool, bundle, modality: str, ranges) -> tuple[float, int]:
    """Share of the modality's readings in ``pool`` outside its range, and how many there were."""
    j = bundle.modalities.index(modality)
    values = pool.signal_std[pool.present[:, j], j]
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 0
    return float(np.mean([ranges[modality].out(float(v)) for v in values])), int(len(values))


def healthy_split(bundle, root: Path, split: str):
    from detection_pools import _sample

    from streamfuse.sim.dataset_plant import load_rows

    rows = [r for r in load_rows(root, split, classes=bundle.classes).rows if set(r.readings) >= set(bundle.modalities)]
    return encode_pool(bundle, [_sample(r.readings) for r in rows], [bundle.classes.index(r.label) for r in rows])


def judge(name: str, bundle, pools: dict, healthy: dict) -> dict:
    ranges = ranges_from_baselines(bundle.baselines)
    fitted_on = {m: "val" for m in ranges}
    if "train" in healthy:  # a validation split too small to fit one (UCR sets): fit on train, judge test
        for j, m in enumerate(bundle.modalities):
            pool = healthy["train"]
            r = SpreadRange.fit(pool.signal_std[pool.present[:, j], j].tolist()) if m not in ranges else None
            if r is not None:
                ranges[m], fitted_on[m] = r, "train"
    out: dict = {"ranges": {m: r.to_dict() | {"fitted_on": fitted_on[m]} for m, r in ranges.items()},
                 "healthy": {}, "faults": {}}
    for label, pool in healthy.items():
        if label == "train" and "train" in fitted_on.values():
            continue
        for m in ranges:
            share, n = out_share(pool, bundle, m, ranges)
            out["healthy"][f"{m}@{label}"] = {"out_share": round(share, 5), "n": n,
                                             "ratio_to_p_out": round(share / ranges[m].p_out, 3)}
    for m, kind in conditions(bundle.modalities):
        if kind != "dropout" and m in ranges:
            share, n = out_share(pools[(m, kind)], bundle, m, ranges)
            out["faults"][f"{m}:{kind}"] = {"out_share": round(share, 4), "n": n}
    print(f"\n{name}")
    for key, v in out["healthy"].items():
        print(f"  healthy {key:22s} out of range {v['out_share']:.4f} of {v['n']} (x{v['ratio_to_p_out']} the assumed p_out)")
    for key, v in out["faults"].items():
        print(f"  fault   {key:22s} out of range {v['out_share']:.3f} of {v['n']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path(".cache/streamfuse/models"), help="model dir (demo bundle)")
    ap.add_argument("--dataset", type=Path, action="append", default=[], help="a metadata.csv dataset (repeatable)")
    ap.add_argument("--dataset-models", type=Path, action="append", default=[], help="the bundle trained on it")
    ap.add_argument("--pool", type=int, default=1000, help="demo plant samples per condition")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if len(args.dataset) != len(args.dataset_models):
        ap.error("give one --dataset-models per --dataset")
    from streamfuse.config import Settings
    from streamfuse.models.bootstrap import ensure_demo_bundle
    from streamfuse.models.bundle_io import load_bundle

    result: dict = {**machine()}
    demo = load_bundle(ensure_demo_bundle(Settings(model_dir=args.models)))
    pools = sim_pools(demo, args.pool, seed=11 + args.seed)
    result["demo_plant"] = judge("demo plant (unseen seed)", demo, pools, {"clean": pools["clean"]})
    for root, models in zip(args.dataset, args.dataset_models):
        bundle = load_bundle(models)
        pools = dataset_pools(bundle, root, args.seed)
        healthy = {split: healthy_split(bundle, root, split) for split in ("train", "test")}
        result[root.name] = judge(f"{root.name} (real)", bundle, pools, healthy)
    emit(result, args.json, show=False)


if __name__ == "__main__":
    main()
