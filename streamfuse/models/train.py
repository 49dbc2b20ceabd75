"""Stage 1 of the recipe: train each modality's model on its own, record its baseline.

Each modality is trained alone (AdamW, cosine schedule, early stopping on validation
macro-F1, best weights kept); its validation Top-1 / macro-F1 become its baseline, and
the UME-fused output of the trained models is scored the same way. Learned fusion comes
later and must beat UME on validation. Training is deterministic for a seed: each
modality is seeded on its own, so adding a modality does not change the others.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from streamfuse.errors import ModelError
from streamfuse.events import MODALITIES, Label, Sample
from streamfuse.models.bundle import bundle_version, save_bundle, weights_digest
from streamfuse.models.config import ModalityConfig, default_config
from streamfuse.models.encoders import SensorModel, create_model
from streamfuse.models.fusion import ume
from streamfuse.models.metrics import macro_f1, top1
from streamfuse.models.preprocess import batch_tensor_checked
from streamfuse.models.runtime import autocast, resolve_device

Pair = tuple[Sample, Label]


@dataclass(frozen=True)
class TrainOptions:
    """Optimizer and loop settings shared by every modality.

    Attributes:
        lr: AdamW peak learning rate (cosine-annealed to 0 over ``epochs``).
        weight_decay: AdamW weight decay.
        batch_size: training batch size.
        patience: stop after this many epochs without a better validation macro-F1.
        threads: torch CPU threads while training; None = every core available. Set it
            (e.g. 1) for bit-identical results across machines with different core
            counts, or on a crowded host, where oversubscribed threads slow training a lot.
    """

    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 3
    threads: int | None = None


@dataclass(frozen=True)
class EpochReport:
    """What :func:`train_bundle` passes to ``progress`` after every epoch."""

    modality: str
    epoch: int  # 1-based
    epochs: int
    train_loss: float
    val_top1: float
    val_macro_f1: float
    best: bool  # this epoch's weights are the best so far
    seconds: float


def train_bundle(
    train: Sequence[Pair],
    val: Sequence[Pair],
    test: Sequence[Pair] | None,
    out: str | Path,
    *,
    epochs: int = 8,
    seed: int = 0,
    device: str = "auto",
    configs: dict[str, ModalityConfig] | None = None,
    progress: Callable[[EpochReport], None] | None = None,
    options: TrainOptions | None = None,
    created_ms: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train one model per modality, score them and their UME fusion, save a bundle.

    Args:
        train, val, test: ``(Sample, Label)`` pairs; ``test`` may be None. A sample that
            lacks a modality (or whose reading fails to decode) is skipped for it.
        out: the bundle directory to write.
        epochs: maximum epochs per modality (early stopping may end sooner).
        seed: the same seed and data give the same weights and version ids (on the same
            device type, thread count and library versions: float reductions differ).
        device: ``"auto"`` (CUDA + bf16 autocast when available), ``"cpu"``, ``"cuda"``.
        configs: modality -> config; default: :func:`default_config` for every
            modality seen in ``train``, classes = the sorted label names.
        progress: called with an :class:`EpochReport` after each epoch.
        options: optimizer settings (:class:`TrainOptions`).
        created_ms: the manifest's creation time (epoch ms); default: now.
        overwrite: replace an existing bundle at ``out``.

    Returns:
        The manifest that was written (baselines = validation metrics).

    Raises:
        ModelError: no usable data for a modality, labels outside the classes,
            mismatched sample/label ids, or ``out`` exists and ``overwrite`` is False.
    """
    out, opts, dev = Path(out), options or TrainOptions(), resolve_device(device)
    if out.exists() and not overwrite:
        raise ModelError(f"{out} already exists; choose a new directory or pass overwrite=True", out)
    if epochs < 1:
        raise ModelError(f"epochs must be >= 1, got {epochs}")
    configs = configs or _default_configs(train)
    classes = next(iter(configs.values())).classes
    for m, cfg in configs.items():
        if cfg.modality != m or cfg.classes != classes:
            raise ModelError(f"configs[{m!r}] must be a {m} config with classes {list(classes)}")
    order = [m for m in MODALITIES if m in configs]
    splits = {"train": train, "val": val, "test": test or []}
    labels = {name: _label_ids(pairs, classes, name) for name, pairs in splits.items()}
    models: dict[str, SensorModel] = {}
    probs: dict[str, dict[str, tuple[list[int], torch.Tensor]]] = {"val": {}, "test": {}}
    info: dict[str, Any] = {}
    with _training_mode(opts.threads, dev):
        for m in order:
            data = {name: _decode(configs[m], pairs, labels[name], dev) for name, pairs in splits.items()}
            for name in ("train", "val"):
                if len(data[name][0]) < 2:
                    n = len(data[name][0])
                    raise ModelError(f"{m}: only {n} {name} samples carry a decodable {m} reading; need >= 2")
            model, info[m] = _fit(configs[m], data, epochs, seed, opts, dev, progress)
            model.set_version(f"{m}-{weights_digest(model)[:12]}")
            models[m] = model
            for name in ("val", "test"):
                rows, x, _ = data[name]
                probs[name][m] = (rows, _predict(model, x, dev, len(classes)))
    versions = {m: model.sf_config.version for m, model in models.items()} | {"fusion": "ume"}
    manifest = {
        "version": bundle_version(versions, classes),
        "created_ms": created_ms if created_ms is not None else int(time.time() * 1000),
        "fusion": {"mode": "ume", "version": "ume"},
        "baselines": _scores(probs["val"], labels["val"], order, len(classes)),
        "test": _scores(probs["test"], labels["test"], order, len(classes)) if test else {},
        "training": {
            "seed": seed, "max_epochs": epochs, "options": asdict(opts), "device": str(dev),
            "torch": torch.__version__, "timm": timm.__version__, "modalities": info,
        },
    }
    return save_bundle(out, models, manifest, overwrite=overwrite)


def _default_configs(train: Sequence[Pair]) -> dict[str, ModalityConfig]:
    classes = tuple(sorted({label.label for _, label in train}))
    seen = {m for sample, _ in train for m in sample.readings}
    if len(classes) < 2 or not seen & set(MODALITIES):
        raise ModelError(f"training data needs >= 2 classes and a known modality; got classes {list(classes)}")
    return {m: default_config(m, classes) for m in MODALITIES if m in seen}


def _label_ids(pairs: Sequence[Pair], classes: tuple[str, ...], split: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    ids = []
    for sample, label in pairs:
        if label.sample_id != sample.sample_id:
            raise ModelError(f"{split}: label for {label.sample_id!r} paired with sample {sample.sample_id!r}")
        if label.label not in index:
            raise ModelError(f"{split}: label {label.label!r} is not one of the classes {list(classes)}")
        ids.append(index[label.label])
    return np.asarray(ids, dtype=np.int64)


def _decode(
    cfg: ModalityConfig, pairs: Sequence[Pair], y: np.ndarray, dev: torch.device
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(rows of ``pairs`` used, inputs, labels) for one modality; undecodable readings skipped."""
    rows = [i for i, (sample, _) in enumerate(pairs) if cfg.modality in sample.readings]
    batch = batch_tensor_checked(cfg, [pairs[i][0].readings[cfg.modality] for i in rows], dev)
    rows = [rows[k] for k in batch.indices]
    return rows, batch.tensor, torch.as_tensor(y[rows], device=dev)


def _fit(
    cfg: ModalityConfig,
    data: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]],
    epochs: int,
    seed: int,
    opts: TrainOptions,
    dev: torch.device,
    progress: Callable[[EpochReport], None] | None,
) -> tuple[SensorModel, dict[str, Any]]:
    """Train one modality alone; returns the best-on-validation model and a summary."""
    torch.manual_seed(seed)
    model = create_model(cfg).to(dev)
    # The front end (log-mel) has no trainable parameters and there is no augmentation:
    # compute it once, then train the network on the cached features.
    (_, x, y), (_, xv, yv) = data["train"], data["val"]
    x, xv = _frontend(model, x), _frontend(model, xv)
    gen = torch.Generator().manual_seed(seed)
    steps = -(-len(x) // opts.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    best, best_f1, best_epoch, epoch = None, -1.0, 0, 0
    for epoch in range(1, epochs + 1):
        start, losses = time.perf_counter(), []
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(opts.batch_size):
            if len(idx) > 1:  # batch-norm needs two samples
                idx = idx.to(dev)
                with autocast(dev):
                    loss = F.cross_entropy(model.net(x[idx]).float(), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
        pred = _predict(model.net, xv, dev, cfg.num_classes).argmax(-1).numpy()
        yt = yv.cpu().numpy()
        f1, acc = macro_f1(yt, pred, cfg.num_classes), top1(yt, pred)
        improved = f1 > best_f1
        if improved:
            best_f1, best_epoch = f1, epoch
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress is not None:
            loss = float(np.mean(losses)) if losses else float("nan")
            progress(EpochReport(cfg.modality, epoch, epochs, loss, acc, f1, improved, time.perf_counter() - start))
        if epoch - best_epoch >= opts.patience:
            break
    model.load_state_dict(best)
    n = {f"n_{name}": len(rows) for name, (rows, _, _) in data.items()}
    return model.eval(), {"best_epoch": best_epoch, "epochs_run": epoch, **n}


def _frontend(model: SensorModel, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.frontend(part) for part in x.split(chunk)]) if len(x) else x


def _predict(model: torch.nn.Module, x: torch.Tensor, dev: torch.device, n_classes: int) -> torch.Tensor:
    """Softmax probabilities ``[n, C]`` (float32, CPU) in eval mode."""
    model.eval()
    out = []
    with torch.inference_mode(), autocast(dev):
        for part in x.split(256) if len(x) else ():
            out.append(model(part).float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0, n_classes)


def _scores(
    probs: dict[str, tuple[list[int], torch.Tensor]], y: np.ndarray, order: list[str], n_classes: int
) -> dict[str, dict[str, Any]]:
    """Top-1 / macro-F1 per modality, and of the UME fusion over samples with any modality."""
    scores: dict[str, dict[str, float]] = {}
    stacked = torch.zeros(len(y), len(order), n_classes)
    present = torch.zeros(len(y), len(order), dtype=torch.bool)
    for j, m in enumerate(order):
        rows, p = probs[m]
        if rows:  # a unit without samples gets no score (rather than a made-up 0)
            scores[m] = _score(y[rows], p.argmax(-1).numpy(), n_classes)
        stacked[rows, j], present[rows, j] = p, True
    any_present = present.any(1).numpy()
    if any_present.any():
        fused = ume(stacked, present).argmax(-1).numpy()
        scores["fused"] = _score(y[any_present], fused[any_present], n_classes)
    return scores


def _score(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    return {"top1": top1(y, pred), "macro_f1": macro_f1(y, pred, n_classes), "n": int(len(y))}


@contextlib.contextmanager
def _training_mode(threads: int | None, dev: torch.device) -> Iterator[None]:
    """Threads and determinism for the duration of training; previous settings restored."""
    saved_threads = torch.get_num_threads()
    saved_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_bench = torch.backends.cudnn.benchmark
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or cores)
    if dev.type == "cuda":  # deterministic cuBLAS; only effective before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, on ops without one
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det[0], warn_only=saved_det[1])
        torch.backends.cudnn.benchmark = saved_bench
