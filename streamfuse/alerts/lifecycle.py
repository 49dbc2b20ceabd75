"""Alert identity: a fingerprint that is stable over an alert's life and across restarts."""

from __future__ import annotations

import hashlib


def fingerprint(labels: dict[str, str]) -> str:
    """Stable 16-hex-digit fingerprint of an alert's identifying labels (order-free).

    Examples:
        >>> fingerprint({"kind": "degradation", "modality": "image"}) == fingerprint(
        ...     {"modality": "image", "kind": "degradation"})
        True
        >>> fingerprint({"kind": "degradation", "modality": "image"})
        '9b10b81f6a725174'
    """
    text = "\x1f".join(f"{k}={labels[k]}" for k in sorted(labels))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
