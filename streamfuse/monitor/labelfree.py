"""Label-free evidence of one sample, computed once and shared by its two users: the
window's accuracy estimate (:class:`~streamfuse.monitor.kpis.KpiEngine`) and the
sequential detectors' log-likelihood ratios (:mod:`streamfuse.monitor.sequential`).

Pure: plain labels and confidences in, numbers out (:func:`~streamfuse.monitor.evidence.sample_evidence`
does the math against the bundle's :class:`~streamfuse.monitor.evidence.Calibration`).
"""

from __future__ import annotations

from collections import OrderedDict

from streamfuse.events import Prediction
from streamfuse.monitor.evidence import Calibration, sample_evidence
from streamfuse.monitor.kpis import FUSED

# Label-free blame needs a third opinion: with two answers that differ, nothing says which
# one is wrong (measured on a real two-modality dataset: attributing them anyway masked the
# healthy sensor under a confident fault, and cost fused accuracy). Bundles with two
# modalities rely on the labels and the per-reading sensor checks.
MIN_ANSWERS = 3
LLR_CACHE = 8192  # samples whose evidence is kept from the estimate for the sequential detector


def argmax_label(classes: tuple[str, ...], probs: tuple[float, ...]) -> str:
    """The class of the highest probability (the first one on a tie).

    Examples:
        >>> argmax_label(("normal", "overheat"), (0.3, 0.7)), argmax_label(("a", "b"), (0.5, 0.5))
        ('overheat', 'a')
    """
    return classes[max(range(len(probs)), key=probs.__getitem__)]


def answers(pred: Prediction, leave_out: set[str] | frozenset[str] = frozenset()) -> tuple[dict, dict]:
    """Each modality's answer and confidence in ``pred``, but those of ``leave_out``."""
    labels = {m: argmax_label(pred.classes, p) for m, p in pred.modality_probs.items() if m not in leave_out}
    conf = {m: max(p) for m, p in pred.modality_probs.items() if m not in leave_out}
    return labels, conf


class SampleEvidence:
    """unit -> (P(right), LLR, ...) per sample, against ``calibration``; the latest
    sample's evidence is kept, and the evidence of the last ``LLR_CACHE`` answer sets for
    the sequential detector (which sees the same answers, less the dead sensors')."""

    def __init__(self, calibration: Calibration | None) -> None:
        self.calibration = calibration
        self._latest: tuple[str, dict[str, tuple]] = ("", {})
        self._llr_cache: OrderedDict[tuple, dict[str, tuple]] = OrderedDict()  # (labels, conf) -> evidence

    def recalibrate(self, calibration: Calibration) -> None:
        """Judge from now on against ``calibration`` (the baselines of new model versions)."""
        self.calibration = calibration
        self._latest = ("", {})
        self._llr_cache.clear()

    def of(self, pred: Prediction) -> dict[str, tuple]:
        """unit -> (P(right), LLR) of one sample; computed once per prediction."""
        if self._latest[0] != pred.sample_id:
            labels, conf = answers(pred)
            self._latest = (pred.sample_id, sample_evidence(self.calibration, labels, pred.fused_label, conf))
            self._llr_cache[(tuple(sorted(labels.items())), tuple(sorted(conf.items())))] = self._latest[1]
            if len(self._llr_cache) > LLR_CACHE:
                self._llr_cache.popitem(last=False)
        return self._latest[1]

    def estimate(self, pred: Prediction) -> dict[str, list]:
        """The KPI engine's estimator: unit -> [P(right) if healthy, P(right) if broken] of one sample."""
        return {u: [v[0], v[2]] for u, v in self.of(pred).items() if v[0] is not None}

    def llr(self, labels: dict[str, str], conf: dict[str, float]) -> dict[str, float]:
        """The sequential detector's evidence: modality -> LLR of these answers."""
        key = (tuple(sorted(labels.items())), tuple(sorted(conf.items())))
        ev = self._llr_cache.get(key)  # computed with the estimate when nothing was left out
        if ev is None:
            ev = sample_evidence(self.calibration, labels, None, conf)
        return {m: v[1] for m, v in ev.items() if m != FUSED and v[1] is not None}
