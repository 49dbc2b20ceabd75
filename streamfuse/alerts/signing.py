"""Webhook signatures: HMAC-SHA256 over a timestamp and the exact body bytes.

Every webhook request from a subscription with a secret carries::

    X-Streamfuse-Timestamp: <unix seconds when this attempt was sent>
    X-Streamfuse-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

The signed string is the ASCII timestamp, one ``.``, then the raw request body. Each
retry is signed afresh with its own timestamp. A receiver recomputes the HMAC with its
copy of the secret, compares in constant time, and refuses timestamps outside a replay
window (default 5 minutes) — :func:`verify_signature` does all three. Every request also
carries ``X-Streamfuse-Notification-Id``, stable across retries, for receivers that want
to drop the rare repeat a crash between their reply and the dispatcher's record can cause.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Mapping

from streamfuse.alerts.errors import InvalidSignature

SIGNATURE_HEADER = "X-Streamfuse-Signature"
TIMESTAMP_HEADER = "X-Streamfuse-Timestamp"
NOTIFICATION_HEADER = "X-Streamfuse-Notification-Id"
DEFAULT_TOLERANCE_S = 300


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Streamfuse-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds).

    Examples:
        >>> sign(b'{"version":"4"}', "s3cret", 1_800_000_000)
        'sha256=ea2548747beadba5f390db1e22bcad6627782556138312fa64d2876fd09fa73b'
    """
    mac = hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(body: bytes, secret: str, timestamp: int) -> dict[str, str]:
    """The two signature headers for one attempt."""
    return {TIMESTAMP_HEADER: str(int(timestamp)), SIGNATURE_HEADER: sign(body, secret, timestamp)}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # plain dicts are case-sensitive; HTTP header names are not
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def verify_signature(body: bytes, headers: Mapping[str, str], secret: str, *, now_s: float | None = None,
                     tolerance_s: float = DEFAULT_TOLERANCE_S) -> None:
    """Check a webhook request's signature; use it in receivers before trusting the body.

    Args:
        body: the raw request body, exactly as received (not re-serialized JSON).
        headers: the request headers (any mapping; names are matched case-insensitively).
        secret: the subscription's secret.
        now_s: the receiver's clock in unix seconds (default: ``time.time()``).
        tolerance_s: the replay window: timestamps further than this from ``now_s`` are refused.

    Raises:
        InvalidSignature: ``reason`` is ``missing``, ``malformed``, ``stale`` or ``mismatch``.

    Examples:
        >>> body = b'{"version":"4"}'
        >>> verify_signature(body, signed_headers(body, "s3cret", 1_800_000_000), "s3cret", now_s=1_800_000_030)
        >>> verify_signature(body, signed_headers(body, "s3cret", 1_800_000_000), "s3cret",
        ...                  now_s=1_800_001_000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        streamfuse.alerts.errors.InvalidSignature: webhook signature stale: ... the replay window is 300 s
    """
    sig, ts = _header(headers, SIGNATURE_HEADER), _header(headers, TIMESTAMP_HEADER)
    if not sig or not ts:
        raise InvalidSignature("missing", f"the request lacks {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}")
    try:
        stamp = int(ts)
    except ValueError:
        raise InvalidSignature("malformed", f"{TIMESTAMP_HEADER} {ts[:32]!r} is not unix seconds") from None
    if not sig.startswith("sha256="):
        raise InvalidSignature("malformed", f"{SIGNATURE_HEADER} must start with 'sha256='")
    now = time.time() if now_s is None else now_s
    if abs(now - stamp) > tolerance_s:
        raise InvalidSignature("stale", f"timestamp {stamp} is {abs(now - stamp):.0f} s from now; "
                                        f"the replay window is {tolerance_s:.0f} s")
    if not hmac.compare_digest(sig.encode(), sign(body, secret, stamp).encode()):
        raise InvalidSignature("mismatch", "the body or the secret differs from what was signed")
