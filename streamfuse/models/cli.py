"""CLI pieces for models: ``train``, ``dataset export-sim``, ``models list|import|activate|rollback|history``.

The main ``streamfuse`` app mounts them::

    app.command()(train)
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(models_app, name="models")

They read :class:`~streamfuse.config.Settings` from the environment (``STREAMFUSE_*``).
A :class:`~streamfuse.errors.StreamfuseError` is printed (with its fix) to stderr and exits
with 2 (:mod:`streamfuse.cli_errors`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from streamfuse.cli_errors import cli_errors, new_typer

if TYPE_CHECKING:  # imported where used: the CLI starts without torch
    from streamfuse.models.dataset import Dataset
    from streamfuse.models.train import TrainConfig

__all__ = ["dataset_app", "models_app", "train"]
console = Console()
dataset_app = new_typer(help="Datasets for training: metadata.csv + one file per reading.")
models_app = new_typer(help="The model registry: versions per unit, active versions, history.")


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


class _Bars:
    """One rich progress bar per (stage, unit); a bar that stopped early is completed."""

    def __init__(self, progress: Any) -> None:
        self.progress, self.tasks, self.last, self.best = progress, {}, None, {}

    def __call__(self, r: Any) -> None:
        key = (r.stage, r.modality)
        if key not in self.tasks:
            if self.last is not None:
                self.progress.update(self.last, completed=self.progress.tasks[self.last].total)
            label = {"stage1": "stage 1", "fusion": "stage 2", "joint": "joint", "probe": "probe"}[r.stage]
            self.tasks[key] = self.progress.add_task(f"{label} {r.modality}", total=r.epochs, f1="")
            self.last = self.tasks[key]
        if r.best:
            self.best[key] = (r.val_macro_f1, r.epoch)
        f1, epoch = self.best.get(key, (r.val_macro_f1, r.epoch))
        self.progress.update(self.tasks[key], completed=r.epoch, f1=f"best val macro-F1 {f1:.3f} (epoch {epoch})")

    def close(self) -> None:
        if self.last is not None:
            self.progress.update(self.last, completed=self.progress.tasks[self.last].total)


@cli_errors()  # mounted on its own, outside the groups
def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder with metadata.csv."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write."),
    modalities: list[str] = typer.Option([], "--modalities", "-m",
                                         help="Modalities to train (repeat or comma-separate); default: all."),
    fusion: str = typer.Option("auto", help="auto | ume | weighted | head | quality | mmlora (auto keeps UME unless "
                               "beaten on val; quality: per-sample weights from the validation calibration)."),
    umt_weight: float = typer.Option(0.0, "--umt-weight", help="λ of the uni-modal-teacher loss; > 0 fine-tunes."),
    epochs: int = typer.Option(60, help="Maximum epochs per model (early stopping on val macro-F1)."),
    seed: int = typer.Option(0, help="Seed; the same seed and data give the same versions."),
    compare: bool = typer.Option(False, "--compare", help="Also train the joint model; print and save the table."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:N] (default: STREAMFUSE_WORKER__DEVICE)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out."),
    register: bool = typer.Option(False, "--import", help="Import the bundle into the registry and activate it."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: every core; 1 on a busy host)."),
    preset: str = typer.Option("accurate", help="accurate (stronger backbones, augmentation) | fast (the demo's)."),
    arch: list[str] = typer.Option([], "--arch", help="MODALITY=NAME: any timm name for image/audio, or "
                                   "sf_resnet1d | sf_inception_time | sf_series_cnn for series (repeat)."),
    weights: list[str] = typer.Option([], "--weights", help="MODALITY=PATH: pretrained .safetensors or weights-only "
                                      ".pt/.pth (timm, torchvision) to fine-tune from (repeat)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image input size (pixels)."),
    series_len: Optional[int] = typer.Option(None, "--series-len", help="Series length (default: from the data)."),
    sample_rate: Optional[int] = typer.Option(None, "--sample-rate", help="Audio rate the clips are resampled to."),
    n_mels: Optional[int] = typer.Option(None, "--n-mels", help="Mel bands of the audio front end."),
    patience: Optional[int] = typer.Option(None, help="Epochs without a better val macro-F1 before stopping."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Wall-clock budget in seconds."),
    mmlora: Optional[bool] = typer.Option(None, "--mmlora/--no-mmlora",
                                          help="Also train MMLoRA (default: with --compare or --fusion mmlora)."),
) -> None:
    """Train per-modality models (stage 1), then the fusion (stage 2); write a bundle."""
    from streamfuse.config import Settings
    from streamfuse.models.train import TrainConfig, preset_options

    settings = Settings()
    t0 = time.perf_counter()
    ds = _load_for_training(data, modalities, compare)
    config = TrainConfig(
        epochs=epochs, seed=seed, device=device or settings.worker.device, overwrite=overwrite, fusion=fusion,
        umt_weight=umt_weight, compare=compare, preset=preset,
        options=preset_options(preset, threads=threads, patience=patience, time_budget_s=time_budget),
        overrides=_overrides(arch, image_size, series_len, sample_rate, n_mels), weights=_pairs(weights, "--weights"),
        mmlora=bool(compare if mmlora is None else mmlora) or fusion == "mmlora")
    man = _train_with_bars(ds, out, config)
    _print_bundle(man, out, fusion, compare, time.perf_counter() - t0)
    if register:
        from streamfuse.models.registry import Registry

        units = Registry(settings).import_bundle(out, activate=True)
        console.print(f"imported and activated: {units}")


def _load_for_training(data: Path, modalities: list[str], compare: bool) -> Dataset:
    """The dataset at ``data`` (only the ``--modalities`` asked for; a test split with
    ``--compare``), its sizes, classes and modalities printed."""
    from streamfuse.models.dataset import load_dataset

    mods = [m.strip() for item in modalities for m in item.split(",") if m.strip()] or None
    ds = load_dataset(data, modalities=mods, require=("train", "val", "test") if compare else ("train", "val"))
    sizes = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
    console.print(f"dataset {data}: {sizes}; classes {list(ds.classes)}; modalities {list(ds.modalities)}")
    return ds


def _train_with_bars(ds: Dataset, out: Path, config: TrainConfig) -> dict[str, Any]:
    """``train_bundle`` on the dataset's splits, showing a progress bar per stage and unit."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streamfuse.models.train import train_bundle

    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[f1]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bars = _Bars(progress)
        man = train_bundle(ds.split("train"), ds.split("val"), ds.split("test") or None, out, config, progress=bars)
        bars.close()
    return man


def _print_bundle(man: dict[str, Any], out: Path, fusion: str, compare: bool, seconds: float) -> None:
    """The scores of every unit of the bundle written, the fusion chosen and the comparison."""
    from streamfuse.models.compare import JSON_FILE, MD_FILE, rich_table

    t = Table(title=f"bundle {man['version']} (validation = baselines)")
    for col in ("unit", "version", "val Top-1", "val macro-F1", "test Top-1", "test macro-F1"):
        t.add_column(col)
    versions = {m: man["configs"][m]["version"] for m in man["modalities"]} | {"fused": man["fusion"]["version"]}
    for unit, ver in versions.items():
        b, s = man["baselines"].get(unit, {}), man.get("test", {}).get(unit, {})
        t.add_row(unit, ver, _fmt(b.get("top1")), _fmt(b.get("macro_f1")), _fmt(s.get("top1")), _fmt(s.get("macro_f1")))
    console.print(t)
    cands = ", ".join(f"{k} {v['val']['macro_f1']:.3f}" for k, v in man["fusion"]["candidates"].items())
    console.print(f"fusion: {man['fusion']['mode']} (requested {fusion}; val macro-F1: {cands})")
    if compare:
        console.print(rich_table(man["compare"]))
        console.print(f"comparison saved to {out / JSON_FILE} and {out / MD_FILE}")
    console.print(f"bundle written to {out} in {seconds:.1f} s")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """``["image=a", "series=b"]`` -> ``{"image": "a", "series": "b"}``."""
    from streamfuse.errors import ConfigError
    from streamfuse.events import MODALITIES

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in MODALITIES or not value.strip():
            raise ConfigError(f"{flag} {item!r}: expected MODALITY=VALUE with MODALITY one of {list(MODALITIES)}")
        out[key.strip()] = value.strip()
    return out


def _overrides(arch: list[str], image_size: Any, series_len: Any, sample_rate: Any, n_mels: Any) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {m: {"arch": a} for m, a in _pairs(arch, "--arch").items()}
    for m, key, value in (("image", "image_size", image_size), ("series", "series_len", series_len),
                          ("audio", "sample_rate", sample_rate), ("audio", "n_mels", n_mels)):
        if value is not None:
            out.setdefault(m, {})[key] = value
    if sample_rate is not None:  # a one-second clip at the new rate
        out["audio"]["clip_samples"] = sample_rate
    return out


@dataset_app.command("export-sim")
def export_sim_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to create."),
    samples: int = typer.Option(1000, "--samples", help="Total samples (70 / 15 / 15 % train / val / test)."),
    seed: int = typer.Option(0, help="Seed of the simulated plant."),
) -> None:
    """Write simulated plant data as a dataset folder (metadata.csv + jpg / wav / npy)."""
    from streamfuse.models.dataset import export_sim

    meta = export_sim(out, samples, seed)
    console.print(f"wrote {samples} samples to {meta.parent} (index: {meta})")


@dataset_app.command("export-real")
def export_real_cmd(
    name: str = typer.Argument(..., help="digits | basicmotions | gunpoint | arrowhead"),
    out: Path = typer.Option(..., "--out", help="Folder to create."),
    seed: int = typer.Option(0, help="Seed of the split (and of digits' voices and noise)."),
) -> None:
    """Write a public real dataset that an installed package ships (no download) as a dataset folder."""
    from streamfuse.models.realdata import export_real

    meta = export_real(name, out, seed)
    console.print(f"wrote {name} to {meta.parent} (index: {meta})")


def _registry() -> Any:
    from streamfuse.config import Settings
    from streamfuse.models.registry import Registry

    return Registry(Settings())


@models_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every unit's versions on disk, the active one marked, with validation baselines."""
    from streamfuse.models.registry import UNITS

    reg = _registry()
    active = reg.active()
    rows = []
    for unit in UNITS:
        for v in reg.versions(unit):
            man = reg.manifest(unit, v)
            rows.append({"unit": unit, "version": v, "active": active.get(unit) == v, "baseline": man["baseline"],
                         "bundle": man.get("source", {}).get("bundle", "")})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title=f"model units under {reg.root}")
    for col in ("unit", "version", "active", "val Top-1", "val macro-F1", "from bundle"):
        t.add_column(col)
    for r in rows:
        b = r["baseline"]
        t.add_row(r["unit"], r["version"], "*" if r["active"] else "", _fmt(b.get("top1")), _fmt(b.get("macro_f1")),
                  r["bundle"])
    console.print(t)


@models_app.command("import")
def import_cmd(
    path: Path = typer.Argument(..., help="Bundle directory (from `streamfuse train`)."),
    activate: bool = typer.Option(True, "--activate/--no-activate", help="Activate its units."),
) -> None:
    """Store a bundle's units in the registry (idempotent) and activate them."""
    units = _registry().import_bundle(path, activate=activate)
    console.print(("imported and activated: " if activate else "imported: ") + json.dumps(units))


@models_app.command("import-unit")
def import_unit_cmd(
    modality: str = typer.Argument(..., help="image | audio | series"),
    arch: str = typer.Option(..., "--arch", help="Architecture of the weights (a timm name or an sf_* backbone)."),
    weights: Path = typer.Option(..., "--weights", help="The trained weights, .safetensors (never a pickle)."),
    preprocessing: Path = typer.Option(..., "--preprocessing", help="JSON: classes and preprocessing fields."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder; its val split gives the baseline."),
    activate: bool = typer.Option(False, "--activate/--no-activate", help="Activate the new version."),
) -> None:
    """Register a model trained elsewhere as a unit, after checking shapes, classes and a probe forward pass."""
    version = _registry().import_unit(modality, arch, weights, preprocessing, data, activate=activate)
    console.print(f"{modality}: imported {version}" + (" and activated" if activate else ""))


@models_app.command("activate")
def activate_cmd(unit: str, version: str, reason: str = typer.Option("", help="Why (kept in the history).")) -> None:
    """Make VERSION the active version of UNIT (after checking it loads)."""
    _registry().activate(unit, version, reason=reason, actor="cli")
    console.print(f"{unit}: {version} active")


@models_app.command("rollback")
def rollback_cmd(unit: str, reason: str = typer.Option("", help="Why (kept in the history).")) -> None:
    """Re-activate the version of UNIT that was active before the current one."""
    version = _registry().rollback(unit, reason=reason, actor="cli")
    console.print(f"{unit}: rolled back to {version}")


@models_app.command("history")
def history_cmd(unit: str, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every activation and rollback of UNIT, oldest first."""
    entries = _registry().history(unit)
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    t = Table(title=f"history of {unit}")
    for col in ("time (UTC)", "action", "version", "previous", "actor", "reason"):
        t.add_column(col)
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["ts_ms"] / 1000))
        t.add_row(when, e["action"], e["version"], e["previous"] or "-", e["actor"], e["reason"])
    console.print(t)
