"""Stage 1: train one modality alone; plus the training loop every stage shares.

:func:`fit_loop` is AdamW with a cosine schedule, early stopping on validation
macro-F1 and the best weights kept; stage 1 (:func:`fit_modality`), stage 2
(:mod:`streamfuse.models.stage2`) and the joint model (:mod:`streamfuse.models.joint`)
only supply the loss of a mini-batch and the validation score.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamfuse.models.augment import augment
from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import SensorModel, create_model
from streamfuse.models.runtime import autocast
from streamfuse.models.splits import Split, run_net, score


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
        augment: light per-modality augmentation (:mod:`streamfuse.models.augment`).
        min_steps: an epoch makes at least this many optimizer steps (more passes over
            a small training set, so that patience and the schedule mean something).
        class_weights: weight the loss by inverse class frequency (imbalanced data).
        label_smoothing: of the cross-entropy.
        time_budget_s: wall-clock budget of the whole training (stage 1, stage 2, MMLoRA);
            a model stops after the epoch that crosses its share (None: no budget).
    """

    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    patience: int = 3
    threads: int | None = None
    augment: bool = False
    min_steps: int = 1
    class_weights: bool = False
    label_smoothing: float = 0.0
    time_budget_s: float | None = None


@dataclass(frozen=True)
class EpochReport:
    """What training passes to ``progress`` after every epoch.

    ``stage`` is ``"stage1"`` (``modality`` = the modality), ``"fusion"`` (``modality`` =
    the fusion mode), ``"joint"`` (``modality`` = ``"joint"``) or ``"probe"``.
    """

    modality: str
    epoch: int  # 1-based
    epochs: int
    train_loss: float
    val_top1: float
    val_macro_f1: float
    best: bool  # this epoch's weights are the best so far
    seconds: float
    stage: str = "stage1"


Progress = Callable[[EpochReport], None]


def fit_loop(
    *, name: str, stage: str, n: int, params: Iterable[Any], loss_fn: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[], tuple[float, float]], train_modules: Sequence[nn.Module],
    state_modules: Sequence[nn.Module], epochs: int, seed: int, opts: TrainOptions, progress: Progress | None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train until ``epochs`` or early stopping; the best-on-validation weights are restored.

    Args:
        name, stage: for the :class:`EpochReport`.
        n: number of training examples; ``loss_fn`` gets index batches of them.
        params: parameters or parameter groups for AdamW.
        loss_fn: loss of one mini-batch of indices (called in train mode).
        evaluate: validation ``(top1, macro_f1)`` (sets eval mode itself).
        train_modules: put in train mode before every epoch.
        state_modules: their weights are snapshotted at the best epoch and restored.
        epochs, seed, opts: loop settings; ``seed`` fixes the batch order.
        progress: called after every epoch.
        deadline: ``time.perf_counter()`` after which no new epoch starts (the budget).

    Returns:
        ``{"best_epoch", "epochs_run", "best_val_macro_f1", "stopped"}`` (``stopped``:
        ``"max_epochs"``, ``"patience"`` or ``"time_budget"``).
    """
    gen = torch.Generator().manual_seed(seed)
    passes, steps = _passes_and_steps(n, opts)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    best, best_f1, best_epoch, epoch, stopped = None, -1.0, 0, 0, "max_epochs"
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        losses = _train_epoch(train_modules, n, passes, gen, opts.batch_size, loss_fn, opt, sched)
        acc, f1 = evaluate()
        improved = f1 > best_f1
        if improved:
            best_f1, best_epoch = f1, epoch
            best = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in state_modules]
        if progress is not None:
            loss = float(np.mean(losses)) if losses else float("nan")
            progress(EpochReport(name, epoch, epochs, loss, acc, f1, improved, time.perf_counter() - start, stage))
        if epoch - best_epoch >= opts.patience:
            stopped = "patience"
            break
        if deadline is not None and time.perf_counter() >= deadline and epoch < epochs:
            stopped = "time_budget"
            break
    for module, state in zip(state_modules, best or []):
        module.load_state_dict(state)
    return {"best_epoch": best_epoch, "epochs_run": epoch, "best_val_macro_f1": best_f1, "stopped": stopped}


def _passes_and_steps(n: int, opts: TrainOptions) -> tuple[int, int]:
    """Passes over the ``n`` examples per epoch (enough for ``opts.min_steps`` optimizer
    steps), and the scheduler steps of an epoch.

    Examples:
        >>> _passes_and_steps(100, TrainOptions(batch_size=32, min_steps=10))
        (3, 12)
    """
    batches = max(1, -(-n // opts.batch_size))
    passes = max(1, -(-opts.min_steps // batches))
    return passes, passes * batches


def _train_epoch(train_modules: Sequence[nn.Module], n: int, passes: int, gen: torch.Generator, batch_size: int,
                 loss_fn: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler) -> list[float]:
    """One epoch with ``train_modules`` in train mode: ``passes`` shuffled passes over the
    ``n`` examples in mini-batches, an optimizer step per batch (a batch of one is skipped:
    batch-norm needs two samples) and a scheduler step per batch either way.

    Returns:
        The losses of the steps taken.
    """
    for module in train_modules:
        module.train()
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)]) if passes > 1 \
        else torch.randperm(n, generator=gen)
    losses = []
    for idx in order.split(batch_size):
        if len(idx) > 1:  # batch-norm needs two samples
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
    return losses


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``N / (C * count_c)`` (1 for a class without samples).

    Examples:
        >>> class_weights(torch.tensor([0, 0, 0, 1]), 3).tolist()
        [0.4444444477558136, 1.3333333730697632, 1.0]
    """
    counts = torch.bincount(y.cpu(), minlength=n_classes).float()
    w = len(y) / (n_classes * counts.clamp_min(1))
    return torch.where(counts > 0, w, torch.ones_like(w))


def fit_modality(
    cfg: ModalityConfig, train: Split, val: Split, epochs: int, seed: int, opts: TrainOptions,
    dev: torch.device, progress: Progress | None, *, weights: str | None = None, deadline: float | None = None,
) -> tuple[SensorModel, dict[str, Any]]:
    """Train one modality's model alone on its readings; returns it (eval) and a summary.

    ``weights`` is an optional pretrained checkpoint to start from (fine-tuning);
    ``deadline`` a ``time.perf_counter()`` after which no new epoch starts.
    """
    m = cfg.modality
    torch.manual_seed(seed)
    model = create_model(cfg, weights=weights).to(dev)
    x, y = train.z[m], train.y[train.rows[m].to(dev)]
    xv, yv = val.z[m], val.y.cpu()[val.rows[m]]
    weight = class_weights(y, cfg.num_classes).to(dev) if opts.class_weights else None
    gen = torch.Generator().manual_seed(seed + 17)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(dev)
        xb = augment(m, x[idx], gen) if opts.augment else x[idx]
        with autocast(dev):
            logits = model.net(xb).float()
        return F.cross_entropy(logits, y[idx], weight=weight, label_smoothing=opts.label_smoothing)

    def evaluate() -> tuple[float, float]:
        s = score(yv, run_net(model, xv, dev)[1].argmax(-1), cfg.num_classes)
        return s["top1"], s["macro_f1"]

    info = fit_loop(name=m, stage="stage1", n=len(x), params=model.parameters(), loss_fn=loss_fn,
                    evaluate=evaluate, train_modules=[model], state_modules=[model], epochs=epochs, seed=seed,
                    opts=opts, progress=progress, deadline=deadline)
    if weights is not None:
        info["pretrained"] = str(weights)
    return model.eval(), info


@contextlib.contextmanager
def training_mode(threads: int | None, dev: torch.device) -> Iterator[None]:
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
