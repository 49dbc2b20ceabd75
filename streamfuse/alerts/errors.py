"""Errors of alert routing and delivery; every one says what was wrong and how to fix it."""

from __future__ import annotations

from streamfuse.errors import StreamfuseError


class AlertError(StreamfuseError):
    """Root of the alert subsystem's errors."""


class InvalidMatcher(AlertError):
    """A label matcher is not ``NAME=VALUE``, ``NAME!=VALUE``, ``NAME=~REGEX`` or ``NAME!~REGEX``."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(
            f"invalid label matcher {text!r}: {why}; write NAME=VALUE, NAME!=VALUE, NAME=~REGEX or "
            "NAME!~REGEX, e.g. modality=audio"
        )
        self.text = text


class InvalidDuration(AlertError):
    """A duration is not like ``90s``, ``30m``, ``2h``, ``1d`` or ``1h30m``."""


class InvalidSubscription(AlertError):
    """A subscription's receiver, severity, channel or id is invalid."""


class UnknownSubscription(AlertError):
    """No subscription has this id."""

    def __init__(self, sub_id: str) -> None:
        super().__init__(f"no subscription with id {sub_id!r}; `streamfuse alerts list` shows the ids")
        self.sub_id = sub_id


class SubscriptionExists(AlertError):
    """A subscription with this id exists; creating another with the same id would take it over."""

    def __init__(self, sub_id: str) -> None:
        super().__init__(f"subscription {sub_id!r} exists; delete it first (`streamfuse alerts unsubscribe "
                         f"{sub_id}` or DELETE /subscriptions/{sub_id}), or choose another id")
        self.sub_id = sub_id


class UnknownSilence(AlertError):
    """No silence has this id."""

    def __init__(self, silence_id: str) -> None:
        super().__init__(f"no silence with id {silence_id!r}; `streamfuse alerts list` shows active silences")
        self.silence_id = silence_id


class UnsafeTarget(AlertError):
    """A receiver URL was refused. ``url`` is the URL without credentials, ``reason`` a short code."""

    reason = "unsafe"

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"refused receiver URL {url}: {message}")
        self.url = url


class UnsupportedScheme(UnsafeTarget):
    reason = "scheme"


class CredentialsInUrl(UnsafeTarget):
    reason = "credentials"


class MissingHost(UnsafeTarget):
    reason = "host"


class LinkLocalTarget(UnsafeTarget):
    """Link-local addresses (169.254/16, fe80::/10) and cloud metadata endpoints; never allowed."""

    reason = "link_local"


class ReservedTarget(UnsafeTarget):
    """Unspecified (0.0.0.0, ::), multicast and reserved addresses; never allowed."""

    reason = "reserved"


class PrivateTarget(UnsafeTarget):
    """Loopback and private ranges; allowed only with ``STREAMFUSE_ALERTS__ALLOW_PRIVATE_TARGETS=true``."""

    reason = "private"


class UnresolvableTarget(UnsafeTarget):
    reason = "unresolvable"


class InvalidSignature(AlertError):
    """A webhook's signature is missing, malformed, too old or does not match.

    Attributes:
        reason: ``missing``, ``malformed``, ``stale`` or ``mismatch``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"webhook signature {reason}: {message}")
        self.reason = reason


class DeliveryError(AlertError):
    """One delivery attempt failed. ``retryable`` is False when retrying cannot help (HTTP 4xx)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
