"""Sensor fault specs for the simulated plant.

A spec is ``MODALITY:KIND@START[-END][/ASSET]``: times in seconds from the start of the
run (floats allowed, ``END`` exclusive, no ``END`` = until the run stops), ``ASSET``
restricts the fault to one asset. Examples: ``image:fog@40-90``, ``audio:mute@30/asset-3``,
``series:flatline@5``.

Pure logic: no clock, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamfuse.errors import ConfigError

FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("fog", "blur", "occlude", "dark"),
    "audio": ("noise", "clip", "mute"),
    "series": ("flatline", "noise", "dropout"),
}
GRAMMAR = "MODALITY:KIND@START[-END][/ASSET] (times in seconds from the start)"
EXAMPLE = "image:fog@40-90 or audio:mute@30/asset-3"


class FaultSpecError(ConfigError):
    """A fault spec does not parse or names an unknown modality or kind.

    Attributes:
        spec: the offending spec text.
        problem: what is wrong with it, without the help text.
    """

    def __init__(self, spec: str, problem: str) -> None:
        valid = "; ".join(f"{m}: {'|'.join(k)}" for m, k in FAULT_KINDS.items())
        super().__init__(
            f"bad fault spec {spec!r}: {problem}. Expected {GRAMMAR}; valid kinds are {valid}; "
            f"example: {EXAMPLE}"
        )
        self.spec = spec
        self.problem = problem


def _fmt_seconds(x: float) -> str:
    # repr keeps every digit, so str(spec) parses back to an equal spec
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class FaultSpec:
    """One sensor fault: which modality degrades, how, when and (optionally) where.

    Args:
        modality: a key of :data:`FAULT_KINDS`.
        kind: one of ``FAULT_KINDS[modality]``.
        start_s: first second (inclusive) of the fault, from the start of the run.
        end_s: first second after the fault (exclusive); ``None`` means forever.
        asset_id: the only asset affected; ``None`` means every asset.

    Raises:
        FaultSpecError: (a :class:`~streamfuse.errors.ConfigError`) for an unknown
            modality or kind, a negative or non-finite time, or ``end_s <= start_s``.

    Examples:
        >>> f = FaultSpec("audio", "mute", 30.0, asset_id="asset-3")
        >>> str(f), f.active(31.5, "asset-3"), f.active(31.5, "asset-1")
        ('audio:mute@30/asset-3', True, False)
    """

    modality: str
    kind: str
    start_s: float
    end_s: float | None = None
    asset_id: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def active(self, t_s: float, asset_id: str) -> bool:
        """Whether the fault affects ``asset_id`` at ``t_s`` seconds from the start.

        Args:
            t_s: seconds since the start of the run (event time).
            asset_id: the asset the reading belongs to.

        Returns:
            True when ``start_s <= t_s < end_s`` (no end: ``start_s <= t_s``) and the
            asset matches.
        """
        if self.asset_id is not None and asset_id != self.asset_id:
            return False
        return self.start_s <= t_s and (self.end_s is None or t_s < self.end_s)

    def __str__(self) -> str:
        out = f"{self.modality}:{self.kind}@{_fmt_seconds(self.start_s)}"
        if self.end_s is not None:
            out += f"-{_fmt_seconds(self.end_s)}"
        if self.asset_id is not None:
            out += f"/{self.asset_id}"
        return out


def _validate(f: FaultSpec) -> None:
    def fail(problem: str) -> FaultSpecError:
        # no str(f) here: the fields may not even be strings or numbers
        spec = f"{f.modality}:{f.kind}@{f.start_s}" + (f"-{f.end_s}" if f.end_s is not None else "")
        return FaultSpecError(spec + (f"/{f.asset_id}" if f.asset_id is not None else ""), problem)

    if f.modality not in FAULT_KINDS:
        raise fail(f"unknown modality {f.modality!r} (known: {', '.join(FAULT_KINDS)})")
    kinds = FAULT_KINDS[f.modality]
    if f.kind not in kinds:
        raise fail(f"unknown {f.modality} fault kind {f.kind!r} (known: {', '.join(kinds)})")
    for name, value in (("start", f.start_s), ("end", f.end_s)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"{name} {value!r} is not a finite number of seconds")
        if value < 0:
            raise fail(f"{name} {value!r} is negative; times count from the start of the run")
    if f.end_s is not None and f.end_s <= f.start_s:
        raise fail(f"end {_fmt_seconds(f.end_s)} s is not after start {_fmt_seconds(f.start_s)} s")
    if f.asset_id is not None and (not f.asset_id or f.asset_id != f.asset_id.strip()):
        raise fail(f"asset id {f.asset_id!r} is empty or has surrounding spaces")


def _seconds(spec: str, name: str, text: str) -> float:
    if not text:
        raise FaultSpecError(spec, f"the {name} time is empty")
    try:
        value = float(text)
    except ValueError:
        raise FaultSpecError(spec, f"{name} {text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise FaultSpecError(spec, f"{name} {text!r} is not a finite number of seconds")
    return value


def parse_fault(spec: str) -> FaultSpec:
    """Parse ``MODALITY:KIND@START[-END][/ASSET]``.

    Args:
        spec: e.g. ``"image:fog@40-90"``, ``"audio:mute@30/asset-3"``, ``"series:flatline@5"``.

    Returns:
        The fault; ``str()`` of it gives an equivalent spec back.

    Raises:
        FaultSpecError: (a :class:`~streamfuse.errors.ConfigError`) that quotes the spec,
            says what is wrong, lists the valid modalities and kinds and shows an example.

    Examples:
        >>> parse_fault("image:fog@40-90")
        FaultSpec(modality='image', kind='fog', start_s=40.0, end_s=90.0, asset_id=None)
        >>> str(parse_fault(" series:flatline@2.5/asset-0 "))
        'series:flatline@2.5/asset-0'
    """
    if not isinstance(spec, str):
        raise FaultSpecError(repr(spec), f"expected a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise FaultSpecError(spec, "the spec is empty")
    head, at, when = text.partition("@")
    if not at:
        raise FaultSpecError(spec, "missing '@START' (when the fault begins, in seconds)")
    modality, colon, kind = head.partition(":")
    if not colon:
        raise FaultSpecError(spec, "missing ':' between the modality and the fault kind")
    times, slash, asset = when.partition("/")
    if slash and not asset:
        raise FaultSpecError(spec, "empty asset id after '/'")
    if times.strip().startswith("-"):
        raise FaultSpecError(spec, "the start time is negative; times count from the start of the run")
    start_text, dash, end_text = times.partition("-")
    start = _seconds(spec, "start", start_text.strip())
    end = _seconds(spec, "end", end_text.strip()) if dash else None
    try:
        return FaultSpec(modality.strip(), kind.strip(), start, end, asset.strip() if slash else None)
    except FaultSpecError as exc:
        # re-raise quoting the user's text rather than the dataclass's rendering of it
        raise FaultSpecError(spec, exc.problem) from None
