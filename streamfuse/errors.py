"""The one root of every streamfuse error. Each error carries data and says how to fix it."""

from __future__ import annotations


class StreamfuseError(Exception):
    """Root of all streamfuse errors."""


class ConfigError(StreamfuseError):
    """A setting or CLI option is invalid."""


class BrokerError(StreamfuseError):
    """The Kafka broker could not be started or reached."""


class ModelError(StreamfuseError):
    """A model bundle is missing, incomplete or inconsistent."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class InvalidEvent(StreamfuseError):
    """An event failed validation; it belongs in the dead-letter topic.

    Attributes:
        reason: a short code from :data:`streamfuse.events.REASONS` (a metric label).
        detail: a human-readable explanation.
        modality: the modality whose reading was bad, when only one reading was.
    """

    def __init__(self, reason: str, detail: str, modality: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.modality = modality


class RedisUnavailable(StreamfuseError):
    """Redis did not answer before a deadline (see :class:`streamfuse.redislink.RedisLink`).

    Attributes:
        what: the operation that needed Redis.
        down_s: how long Redis had been unreachable.
    """

    def __init__(self, what: str, down_s: float) -> None:
        super().__init__(f"Redis unreachable for {down_s:.1f} s while {what}; check that Redis runs "
                         "and STREAMFUSE_REDIS_URL points at it")
        self.what = what
        self.down_s = down_s
