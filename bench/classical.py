"""The classical reference of ``bench/real_data.py``: hand features + logistic regression.

Per modality, features of the decoded reading (the same decoding the models get, from
:mod:`streamfuse.models.preprocess`) go through a standard scaler and an L2 logistic
regression whose ``C`` is chosen on the validation split; the classical UME averages the
modalities' probabilities. Features:

- image: grey levels at 16x16 and a 4x4-cell histogram of gradient orientations (HOG-like);
- audio: per mel band, mean / std / max of the log-mel over time, and their deltas' mean
  absolute value (an MFCC-statistics classic);
- series: per channel, moments, percentiles, zero crossings, autocorrelation at a few
  lags, log energies in 16 FFT bands, and the series itself decimated to 64 points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from streamfuse.models.config import ModalityConfig
from streamfuse.models.encoders import LogMel
from streamfuse.models.metrics import macro_f1, top1
from streamfuse.models.preprocess import batch_tensor_checked

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def _image_features(x: torch.Tensor) -> np.ndarray:
    grey = x.mean(1, keepdim=True)
    small = F.interpolate(grey, size=(16, 16), mode="bilinear", antialias=True, align_corners=False).flatten(1)
    gx = grey[..., :, 1:] - grey[..., :, :-1]
    gy = grey[..., 1:, :] - grey[..., :-1, :]
    gx, gy = gx[..., :-1, :], gy[..., :, :-1]
    mag, ang = torch.hypot(gx, gy), torch.atan2(gy, gx) % np.pi
    bins = (ang / np.pi * 8).long().clamp(max=7)
    hist = torch.zeros(len(x), 8, *mag.shape[-2:])
    hist.scatter_(1, bins, mag)
    cells = F.adaptive_avg_pool2d(hist, 4).flatten(1)
    return torch.cat([small, cells], 1).numpy()


def _audio_features(x: torch.Tensor, cfg: ModalityConfig) -> np.ndarray:
    mel = LogMel(cfg)(x)[:, 0]  # [B, n_mels, T]
    delta = (mel[..., 1:] - mel[..., :-1]).abs().mean(-1)
    return torch.cat([mel.mean(-1), mel.std(-1), mel.amax(-1), delta], 1).numpy()


def _series_features(x: torch.Tensor) -> np.ndarray:
    x = x.double()
    mu, sd = x.mean(-1, keepdim=True), x.std(-1, keepdim=True).clamp_min(1e-9)
    z = (x - mu) / sd
    q = torch.quantile(x, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=x.dtype), dim=-1).permute(1, 2, 0)
    feats = [mu, sd, (z**3).mean(-1, keepdim=True), (z**4).mean(-1, keepdim=True), q.flatten(2),
             (torch.diff(torch.sign(x - mu), dim=-1) != 0).double().mean(-1, keepdim=True)]
    n = x.shape[-1]
    feats += [(z[..., :-lag] * z[..., lag:]).mean(-1, keepdim=True) for lag in (1, 2, 4, 8, 16) if lag < n]
    power = torch.fft.rfft(x - mu).abs() ** 2
    bands = torch.tensor_split(power, min(16, power.shape[-1]), dim=-1)
    feats.append(torch.stack([b.sum(-1) for b in bands], -1).clamp_min(1e-12).log())
    feats.append(F.interpolate(x, size=64, mode="linear", align_corners=False))
    return torch.cat(feats, -1).flatten(1).float().numpy()


def features(cfg: ModalityConfig, readings: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
    """Hand features of the readings that decode, and their positions."""
    batch = batch_tensor_checked(cfg, readings)
    x = batch.tensor
    with torch.no_grad():
        if cfg.modality == "image":
            f = _image_features(x)
        elif cfg.modality == "audio":
            f = _audio_features(x, cfg)
        else:
            f = _series_features(x)
    return f, batch.indices


def fit_classical(xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], seed: int) -> Any:
    """A scaler + logistic regression, ``C`` picked on validation macro-F1."""
    n_classes = int(max(ys["train"].max(), ys["val"].max()) + 1)
    best, best_f1 = None, -1.0
    for c in C_GRID:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, random_state=seed))
        model.fit(xs["train"], ys["train"])
        f1 = macro_f1(ys["val"], model.predict(xs["val"]), n_classes)
        if f1 > best_f1:
            best, best_f1 = model, f1
    return best


def classical_scores(configs: dict[str, ModalityConfig], splits: dict[str, list], classes: Sequence[str],
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Test Top-1 / macro-F1 per modality and of the classical UME (``"ume"``)."""
    index = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    y = {k: np.array([index[lab.label] for _, lab in v]) for k, v in splits.items()}
    probs = np.zeros((len(splits["test"]), len(configs), n))
    present = np.zeros((len(splits["test"]), len(configs)), dtype=bool)
    out: dict[str, dict[str, float]] = {}
    for j, (m, cfg) in enumerate(configs.items()):
        xs, ys, rows = {}, {}, {}
        for k, pairs in splits.items():
            have = [i for i, (s, _) in enumerate(pairs) if m in s.readings]
            f, idx = features(cfg, [pairs[i][0].readings[m] for i in have])
            rows[k] = [have[i] for i in idx]
            xs[k], ys[k] = f, y[k][rows[k]]
        model = fit_classical(xs, ys, seed)
        p = model.predict_proba(xs["test"])
        full = np.zeros((len(p), n))
        full[:, model.classes_] = p
        probs[rows["test"], j], present[rows["test"], j] = full, True
        pred = full.argmax(1)
        out[m] = {"top1": top1(ys["test"], pred), "macro_f1": macro_f1(ys["test"], pred, n)}
    keep = present.any(1)
    fused = (probs * present[..., None]).sum(1)[keep].argmax(1)
    out["ume"] = {"top1": top1(y["test"][keep], fused), "macro_f1": macro_f1(y["test"][keep], fused, n)}
    return out
