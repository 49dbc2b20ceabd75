"""streamfuse models against a classical baseline on public real datasets (same splits).

For each dataset of :mod:`streamfuse.models.realdata` (written to a temporary folder
from the packages that ship it, no download): ``train_bundle`` with the default
architectures and the requested fusion, then MMLoRA on top of the same stage-1 models,
and, in the same run, the classical reference of ``bench/classical.py`` (hand features +
logistic regression per modality, and their UME). Prints the test macro-F1 of each and
its ratio to the classical one, checks the promises (each modality >= classical; the
chosen fusion >= every single modality and the classical UME) and writes JSON.

    python bench/real_data.py --json out/real_data.json
    python bench/real_data.py --datasets digits --fusion auto --epochs 40 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classical import classical_scores  # noqa: E402

from streamfuse.models.dataset import load_dataset  # noqa: E402
from streamfuse.models.realdata import export_real  # noqa: E402
from streamfuse.models.config import ModalityConfig  # noqa: E402
from streamfuse.models.train import TrainConfig, preset_options, train_bundle  # noqa: E402


def run_dataset(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    meta = export_real(name, tmp / name, seed=args.seed)
    ds = load_dataset(meta.parent, require=("train", "val", "test"))
    splits = {k: ds.split(k) for k in ("train", "val", "test")}
    t0 = time.perf_counter()
    overrides = {"image": {"image_size": args.image_size}} if "image" in ds.modalities else {}
    config = TrainConfig(epochs=args.epochs, seed=args.seed, device="cpu", fusion=args.fusion,
                         mmlora=not args.no_mmlora, preset=args.preset, overrides=overrides,
                         options=preset_options(args.preset, threads=args.threads, patience=args.patience))
    man = train_bundle(splits["train"], splits["val"], splits["test"], tmp / f"{name}-bundle", config)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    configs = {m: ModalityConfig.from_dict(man["configs"][m]) for m in man["modalities"]}
    classical = classical_scores(configs, splits, ds.classes, args.seed)
    classical_s = time.perf_counter() - t0
    test = man["test"]
    ours = {m: test[m]["macro_f1"] for m in man["modalities"]}
    cands = man["fusion"]["candidates"]
    rows = {"chosen": test["fused"]["macro_f1"], "ume": cands["ume"]["test"]["macro_f1"]}
    if "mmlora" in cands:
        rows["mmlora"] = cands["mmlora"]["test"]["macro_f1"]
    best_single = max([*ours.values(), *(classical[m]["macro_f1"] for m in ours), classical["ume"]["macro_f1"]])
    checks = {f"{m} >= classical {m}": ours[m] >= classical[m]["macro_f1"] for m in ours}
    checks["chosen fusion >= best single and classical UME"] = rows["chosen"] >= max(
        [*ours.values(), classical["ume"]["macro_f1"]])
    return {"dataset": name, "sizes": {k: len(v) for k, v in splits.items()}, "classes": len(ds.classes),
            "modalities": list(man["modalities"]), "archs": {m: c.arch for m, c in configs.items()},
            "fusion": man["fusion"]["mode"], "streamfuse": {**ours, **rows}, "classical": classical,
            "best_reference": best_single, "checks": checks, "train_s": round(train_s, 1),
            "classical_s": round(classical_s, 1)}


def report(r: dict) -> None:
    print(f"\n{r['dataset']}: {r['sizes']} samples, {r['classes']} classes, archs {r['archs']}, "
          f"trained in {r['train_s']} s (classical {r['classical_s']} s); test macro-F1")
    cl = r["classical"]
    for m in r["modalities"]:
        ours, ref = r["streamfuse"][m], cl[m]["macro_f1"]
        print(f"  {m:<8} streamfuse {ours:.3f}   classical {ref:.3f}   ratio {ours / max(ref, 1e-9):.3f}")
    ref = cl["ume"]["macro_f1"]
    for k in ("chosen", "ume", "mmlora"):
        if k in r["streamfuse"]:
            label = f"fusion {r['fusion']}" if k == "chosen" else k
            v = r["streamfuse"][k]
            print(f"  {label:<16} {v:.3f}   classical UME {ref:.3f}   ratio {v / max(ref, 1e-9):.3f}")
    for name, ok in r["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,basicmotions,gunpoint")
    ap.add_argument("--fusion", default="auto")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--preset", default="accurate")
    ap.add_argument("--image-size", type=int, default=32, help="digits are 8x8 scans: 32 px is plenty")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mmlora", action="store_true", help="skip the MMLoRA candidate")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    meta = {"machine": f"{platform.machine()} {platform.processor()}", "torch": torch.__version__,
            "threads": args.threads, "device": "cpu", "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            results.append(run_dataset(name.strip(), args, Path(tmp)))
            report(results[-1])
            if args.json:  # after every dataset, so a long run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    failed = [f"{r['dataset']}: {k}" for r in results for k, ok in r["checks"].items() if not ok]
    print("\nall checks passed" if not failed else f"\nFAILED: {failed}")


if __name__ == "__main__":
    main()
