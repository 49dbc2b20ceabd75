"""Label-free evidence per sample: how a modality's answer relates to the others', and
what that says, calibrated on the bundle's validation split.

Why not a model's own confidence: a fogged camera answers "normal" with confidence
1.00 while it is right 5 % of the time. What it cannot fake is *agreement*: its answer
stops matching the other sensors', which still see the machine. So each present
modality ``m`` of a sample gets a **category** from the labels of the others ``O``:

* ``agree``   — every other modality gives m's label;
* ``odd``     — the others agree among themselves (two or more of them) and m differs:
  m is the odd one out;
* ``split``   — m matches some of the others but not all;
* ``differ``  — m matches none of the others and they do not agree either (with a
  single other modality, any disagreement is ``differ``).

Each category is split by the modality's own confidence (``+`` at or above
:data:`CONF_HI`, ``-`` below): alone confidence says little, but *confidently* the odd
one out is the signature of a fogged camera, and rare in a healthy one.

One broken modality turns the others' view of each other around (audio's partner
image is now wrong), so the odd one out of a sample is set aside first and the others
are judged among the rest (:func:`categories`). Categories are keyed by how many others
were compared (``k``), because one disagreeing partner says less than two agreeing ones.

A :class:`Calibration` (built at training time from the validation split, stored in the
bundle with each unit's baseline) holds per modality and ``k``:

* ``p_correct[cat]``: how often m was right in that category → the label-free accuracy
  estimate of a window is the mean over its samples (:meth:`Calibration.p_correct`);
* ``llr[cat]``: log of how much likelier the category is for a *broken* modality than
  for the healthy one → the per-sample evidence of the sequential detectors. "Broken"
  is measured, not assumed: m's answers are shuffled across validation samples (cyclic
  shifts), which keeps its answer distribution and removes every link to the machine.

The fused label gets the same treatment (``fused`` entry): its category is how many of
the computed modalities back it (``all``, ``most``, ``half`` or fewer, ``none``).

Pure logic: plain values in, plain values out; no numpy, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamfuse.errors import ConfigError

CATEGORIES: tuple[str, ...] = ("agree", "odd", "split", "differ")
CONF_HI = 0.9  # an answer given with at least this confidence is "sure" (suffix "+", else "-")
FUSED_CATEGORIES: tuple[str, ...] = ("all", "most", "half", "none")
FUSED = "fused"
SHIFTS = 7  # cyclic shifts of a modality's answers that stand in for a broken sensor
PRIOR = 1.0  # add-one smoothing of every count


def _odd_one_out(labels: Mapping[str, str]) -> str | None:
    """The modality whose label differs from all others while those agree (>= 3 modalities)."""
    if len(labels) < 3:
        return None
    for m, y in labels.items():
        rest = {v for o, v in labels.items() if o != m}
        if len(rest) == 1 and y not in rest:
            return m
    return None


def category(label: str, others: Sequence[str]) -> str | None:
    """The category of one answer against the other modalities' answers.

    Examples:
        >>> category("a", ["a", "a"]), category("b", ["a", "a"]), category("a", ["a", "b"])
        ('agree', 'odd', 'split')
        >>> category("c", ["a", "b"]), category("b", ["a"]), category("a", []) is None
        ('differ', 'differ', True)
    """
    if not others:
        return None
    if all(o == label for o in others):
        return "agree"
    if label in others:
        return "split"
    if len(others) >= 2 and len(set(others)) == 1:
        return "odd"
    return "differ"


def categories(labels: Mapping[str, str]) -> dict[str, tuple[int, str]]:
    """Per modality, ``(k, category)`` against the others; the odd one out of the sample
    is judged against all others, the rest without it.

    Examples:
        >>> sorted(categories({"image": "normal", "audio": "bearing", "series": "bearing"}).items())
        [('audio', (1, 'agree')), ('image', (2, 'odd')), ('series', (1, 'agree'))]
        >>> categories({"image": "a"})
        {}
    """
    odd = _odd_one_out(labels)
    out: dict[str, tuple[int, str]] = {}
    for m, y in labels.items():
        others = [v for o, v in labels.items() if o != m and (o != odd or m == odd)]
        cat = category(y, others)
        if cat is not None:
            out[m] = (len(others), cat)
    return out


def fused_category(fused: str, labels: Mapping[str, str]) -> tuple[int, str] | None:
    """``(k, category)`` of the fused label: how many of the ``k`` computed modalities back it.

    Examples:
        >>> fused_category("a", {"image": "a", "audio": "a", "series": "b"})
        (3, 'most')
        >>> fused_category("a", {"image": "b"}), fused_category("a", {})
        ((1, 'none'), None)
    """
    k = len(labels)
    if not k:
        return None
    backing = sum(v == fused for v in labels.values())
    cat = "all" if backing == k else "none" if backing == 0 else "most" if 2 * backing > k else "half"
    return k, cat


@dataclass(frozen=True)
class Table:
    """One modality's (or the fused label's) calibration for one ``k``.

    Attributes:
        p_correct: category -> P(right | category) on the validation split.
        llr: category -> log P(category | broken) - log P(category | healthy).
        n: validation samples behind it.
    """

    p_correct: dict[str, float]
    llr: dict[str, float] = field(default_factory=dict)
    n: int = 0
    p_broken: dict[str, float] = field(default_factory=dict)  # P(right | category) of a broken modality


@dataclass(frozen=True)
class Calibration:
    """Per unit (modality or ``"fused"``) and number of others ``k``, a :class:`Table`.

    Examples:
        >>> rows = [({"image": y, "audio": y, "series": y}, y) for y in "abab"] * 10
        >>> rows += [({"image": "a", "audio": "b", "series": "b"}, "b")] * 4
        >>> cal = Calibration.fit(rows)
        >>> round(cal.p_correct("image", 2, "agree"), 2), round(cal.p_correct("image", 2, "odd"), 2)
        (1.0, 0.0)
        >>> cal.llr("image", 2, "odd") > 0 > cal.llr("image", 2, "agree")
        True
        >>> Calibration.from_dict(cal.to_dict()) == cal
        True
    """

    tables: dict[str, dict[int, Table]]

    def table(self, unit: str, k: int) -> Table | None:
        return self.tables.get(unit, {}).get(k)

    def p_correct(self, unit: str, k: int, cat: str, conf: float | None = None) -> float | None:
        t = self.table(unit, k)
        return None if t is None else t.p_correct.get(key(cat, conf), t.p_correct.get(cat))

    def p_correct_broken(self, unit: str, k: int, cat: str, conf: float | None = None) -> float | None:
        """P(right | category) if the unit is broken (measured on the shuffled answers)."""
        t = self.table(unit, k)
        return None if t is None else t.p_broken.get(key(cat, conf), t.p_broken.get(cat))

    def reliability(self, unit: str, k: int, cat: str, conf: float | None = None,
                    prior_broken: float = 0.5) -> float | None:
        """P(right | category) when the unit may be broken (prior ``prior_broken``): the
        healthy and broken answers mixed by how likely the category is under each. This is
        what a single sample can say: the quality-aware fusion's weight.

        Examples:
            >>> rows = [({"image": y, "audio": y, "series": y}, y) for y in "abab"] * 10
            >>> cal = Calibration.fit(rows + [({"image": "a", "audio": "b", "series": "b"}, "b")] * 4)
            >>> round(cal.reliability("image", 2, "agree"), 2) > 0.9 > round(cal.reliability("image", 2, "odd"), 2)
            True
        """
        healthy, llr = self.p_correct(unit, k, cat, conf), self.llr(unit, k, cat, conf)
        if healthy is None or llr is None:
            return healthy
        broken = self.p_correct_broken(unit, k, cat, conf)
        w = prior_broken * math.exp(llr)
        post = w / (w + 1 - prior_broken)
        return post * (broken if broken is not None else 0.0) + (1 - post) * healthy

    def llr(self, unit: str, k: int, cat: str, conf: float | None = None) -> float | None:
        t = self.table(unit, k)
        return None if t is None else t.llr.get(key(cat, conf), t.llr.get(cat))

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(sorted(self.tables))

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, rows: Sequence[tuple], fused: Sequence[str] | None = None) -> Calibration:
        """Fit on validation rows ``(modality -> predicted label, true label[, modality -> confidence])``.

        Args:
            rows: one entry per validation sample (modalities without an answer absent);
                with confidences the categories are split by :data:`CONF_HI`.
            fused: the fused label per row, for the ``fused`` unit (optional).

        Raises:
            ConfigError: no rows, or ``fused`` of another length.
        """
        if not rows:
            raise ConfigError("a calibration needs validation rows; the validation split is empty")
        if fused is not None and len(fused) != len(rows):
            raise ConfigError(f"fused has {len(fused)} labels for {len(rows)} validation rows")
        expanded = [v for row in rows for v in _variants(_with_conf(row))]
        healthy = _count_healthy(expanded)
        broken, broken_right = _count_shuffled(expanded)
        binned = any(row[2] for row in expanded)
        cats = tuple(key(c, v) for c in CATEGORIES for v in ((1.0, 0.0) if binned else (None,)))
        pooled = _pooled(healthy)
        tables: dict[str, dict[int, Table]] = {}
        for (m, k), cells in healthy.items():
            prior = {c: (r + PRIOR / 2) / (n_ + PRIOR) for (kk, c), (n_, r) in pooled.items() if kk == k}
            tables.setdefault(m, {})[k] = _table(cells, broken.get((m, k), {}), cats, prior,
                                                 broken_right.get((m, k), {}))
        if fused is not None:
            tables[FUSED] = _fused_tables(rows, fused)
        return cls(tables)

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``{unit: {str(k): {"p_correct", "llr", "n"}}}``."""
        return {u: {str(k): {"p_correct": dict(t.p_correct), "llr": dict(t.llr), "n": t.n, "p_broken": dict(t.p_broken)}
                    for k, t in sorted(by_k.items())} for u, by_k in sorted(self.tables.items())}

    def unit_dict(self, unit: str) -> dict[str, Any]:
        """One unit's part of :meth:`to_dict` (what travels with that unit's baseline)."""
        return self.to_dict().get(unit, {})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: naming the unit and entry that is not a valid table.
        """
        tables: dict[str, dict[int, Table]] = {}
        for unit, by_k in (data or {}).items():
            tables[unit] = {}
            for k, t in (by_k or {}).items():
                try:
                    kk = int(k)
                    p = {str(c): float(v) for c, v in t["p_correct"].items()}
                    llr = {str(c): float(v) for c, v in t.get("llr", {}).items()}
                    n = int(t.get("n", 0))
                    pb = {str(c): float(v) for c, v in t.get("p_broken", {}).items()}
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise ConfigError(f"calibration of {unit!r} k={k!r} is not a table "
                                      "{'p_correct': {...}, 'llr': {...}, 'n': N}; retrain the bundle") from None
                if kk < 1 or not all(0.0 <= v <= 1.0 for v in p.values()) or not all(map(math.isfinite, llr.values())):
                    raise ConfigError(f"calibration of {unit!r} k={k!r} has values out of range "
                                      f"(p_correct in [0, 1], llr finite): {t!r}; retrain the bundle")
                tables[unit][kk] = Table(p, llr, n, pb)
        return cls(tables)

    @classmethod
    def from_baselines(cls, baselines: Mapping[str, Mapping[str, Any]]) -> Calibration | None:
        """The calibration carried by a bundle's (or the registry's) baselines, or None."""
        parts = {u: b["calibration"] for u, b in baselines.items() if isinstance(b, Mapping) and b.get("calibration")}
        return cls.from_dict(parts) if parts else None


def key(cat: str, conf: float | None) -> str:
    """A category split by the answer's confidence (unsplit without one).

    Examples:
        >>> key("odd", 1.0), key("odd", 0.5), key("odd", None)
        ('odd+', 'odd-', 'odd')
    """
    return cat if conf is None else cat + ("+" if conf >= CONF_HI else "-")


def _with_conf(row: tuple) -> tuple[Mapping[str, str], str, Mapping[str, float]]:
    return (row[0], row[1], row[2] if len(row) > 2 and row[2] is not None else {})


def _variants(row: tuple) -> list[tuple]:
    """A validation row, plus the row without each one of its modalities (>= 3 of them), so
    that samples with a modality missing or masked are calibrated too."""
    labels, truth, conf = row
    out = [row]
    if len(labels) >= 3:
        out += [({o: v for o, v in labels.items() if o != m}, truth, conf) for m in sorted(labels)]
    return out


def _table(cells: Mapping[str, list[int]], broken: Mapping[str, int], cats: Sequence[str],
           prior: Mapping[str, float] | None = None, broken_right: Mapping[str, int] | None = None) -> Table:
    n = sum(c[0] for c in cells.values())
    nb = sum(broken.values())
    p_correct, llr, p_broken = {}, {}, {}
    overall = (sum(c[1] for c in cells.values()) + PRIOR) / (n + 2 * PRIOR)
    for cat in cats:
        seen, right = cells.get(cat, [0, 0])
        # a rare cell shrinks toward its category over both confidences, that toward the
        # category over every modality (an odd one out is rarely right, whoever it is)
        base = cat.rstrip("+-")
        both = [cells.get(base + s, [0, 0]) for s in "+-"] if base != cat else [[seen, right]]
        n_cat, r_cat = sum(c[0] for c in both), sum(c[1] for c in both)
        parent = (r_cat + PRIOR * (prior or {}).get(base, overall)) / (n_cat + PRIOR)
        p_correct[cat] = round((right + PRIOR * parent) / (seen + PRIOR), 6)
        if broken:
            p_h = (seen + PRIOR) / (n + PRIOR * len(cats))
            p_b = (broken.get(cat, 0) + PRIOR) / (nb + PRIOR * len(cats))
            llr[cat] = round(math.log(p_b / p_h), 6)
            p_broken[cat] = round(((broken_right or {}).get(cat, 0) + PRIOR * 0.5 * parent)
                                  / (broken.get(cat, 0) + PRIOR), 6)
    return Table(p_correct, llr, n, p_broken)


def sample_evidence(cal: Calibration, labels: Mapping[str, str], fused: str | None = None,
                    conf: Mapping[str, float] | None = None) -> dict[str, tuple]:
    """Per unit of one sample: ``(P(right) if healthy, evidence LLR, P(right) if broken)``
    from the calibration.

    A unit whose category the calibration has no table for is absent.

    Examples:
        >>> rows = [({"image": y, "audio": y, "series": y}, y) for y in "abab"] * 10
        >>> cal = Calibration.fit(rows, fused=[y for _, y in rows])
        >>> ev = sample_evidence(cal, {"image": "a", "audio": "a", "series": "a"}, fused="a")
        >>> sorted(ev), ev["fused"][1] is None
        (['audio', 'fused', 'image', 'series'], True)
    """
    out: dict[str, tuple[float | None, float | None]] = {}
    conf = conf or {}
    for m, (k, cat) in categories(labels).items():
        if cal.table(m, k) is not None:
            c = conf.get(m)
            out[m] = (cal.p_correct(m, k, cat, c), cal.llr(m, k, cat, c), cal.p_correct_broken(m, k, cat, c))
    if fused is not None:
        kc = fused_category(fused, labels)
        t = cal.table(FUSED, kc[0]) if kc is not None else None
        if t is not None:
            out[FUSED] = (t.p_correct.get(kc[1]), None, None)
    return out


def estimate_errors(windows: Sequence[tuple[str, float | None, float | None, int]]) -> dict[str, Any]:
    """How far the label-free estimate was from the labelled accuracy, per window.

    Args:
        windows: ``(unit, estimated accuracy, labelled accuracy, labelled samples)`` of
            each closed window (a scope's snapshot); windows without both are skipped.

    Returns:
        ``{"windows", "median_abs_error", "p90_abs_error", "by_unit": {unit: {...}}}``.

    Examples:
        >>> estimate_errors([("image", 0.9, 0.95, 20), ("image", 0.1, 0.05, 20), ("audio", None, 0.9, 20)])
        {'windows': 2, 'median_abs_error': 0.05, 'p90_abs_error': 0.05, 'by_unit': {'image': {'windows': 2, 'median_abs_error': 0.05, 'p90_abs_error': 0.05}}}
    """
    def stats(errs: list[float]) -> dict[str, Any]:
        errs = sorted(errs)
        if not errs:
            return {"windows": 0, "median_abs_error": None, "p90_abs_error": None}
        mid = len(errs) // 2
        med = errs[mid] if len(errs) % 2 else (errs[mid - 1] + errs[mid]) / 2
        return {"windows": len(errs), "median_abs_error": round(med, 4),
                "p90_abs_error": round(errs[min(len(errs) - 1, int(0.9 * len(errs)))], 4)}

    by_unit: dict[str, list[float]] = {}
    for unit, est, acc, n in windows:
        if est is not None and acc is not None and n > 0:
            by_unit.setdefault(unit, []).append(abs(est - acc))
    return {**stats([e for v in by_unit.values() for e in v]),
            "by_unit": {u: stats(v) for u, v in sorted(by_unit.items())}}


# ---------------------------------------------------------------------- fitting helpers


def _count_healthy(expanded: list[tuple]) -> dict[tuple[str, int], dict[str, list[int]]]:
    """(modality, k) -> category -> [seen, right] of the validation answers as they are."""
    healthy: dict[tuple[str, int], dict[str, list[int]]] = {}
    for labels, truth, conf in expanded:
        for m, (k, cat) in categories(labels).items():
            cell = healthy.setdefault((m, k), {}).setdefault(key(cat, conf.get(m)), [0, 0])
            cell[0] += 1
            cell[1] += labels[m] == truth
    return healthy


def _count_shuffled(expanded: list[tuple]) -> tuple[dict, dict]:
    """A broken unit, simulated: each modality's answer replaced by another row's (shifted
    by 1..``SHIFTS``); (modality, k) -> category -> how often seen, and how often right."""
    broken: dict[tuple[str, int], dict[str, int]] = {}
    broken_right: dict[tuple[str, int], dict[str, int]] = {}
    n = len(expanded)
    for shift in range(1, min(SHIFTS, n - 1) + 1):
        for i, (labels, _, _) in enumerate(expanded):
            donor, donor_conf = expanded[(i + shift) % n][0], expanded[(i + shift) % n][2]
            for m in labels:
                if m not in donor:
                    continue
                k_cat = categories({**labels, m: donor[m]}).get(m)
                if k_cat is not None:
                    counts = broken.setdefault((m, k_cat[0]), {})
                    cat = key(k_cat[1], donor_conf.get(m))
                    counts[cat] = counts.get(cat, 0) + 1
                    right = broken_right.setdefault((m, k_cat[0]), {})
                    right[cat] = right.get(cat, 0) + (donor[m] == expanded[i][1])
    return broken, broken_right


def _pooled(healthy: dict[tuple[str, int], dict[str, list[int]]]) -> dict[tuple[int, str], list[int]]:
    """Every modality's cells together, by (k, category without its confidence bin): the prior of a rare one."""
    pooled: dict[tuple[int, str], list[int]] = {}
    for (m, k), cells in healthy.items():
        for cat, (seen, right) in cells.items():
            cell = pooled.setdefault((k, cat.rstrip("+-")), [0, 0])
            cell[0] += seen
            cell[1] += right
    return pooled


def _fused_tables(rows: Sequence[tuple], fused: Sequence[str]) -> dict[int, Table]:
    """The ``fused`` unit's tables: how often the fused label is right, by how the modalities agree with it."""
    cells_f: dict[int, dict[str, list[int]]] = {}
    for (labels, truth, _), y in zip(map(_with_conf, rows), fused):
        kc = fused_category(y, labels)
        if kc is not None:
            cell = cells_f.setdefault(kc[0], {}).setdefault(kc[1], [0, 0])
            cell[0] += 1
            cell[1] += y == truth
    return {k: _table(c, {}, FUSED_CATEGORIES) for k, c in cells_f.items()}
