"""Webhook secrets at rest: sealed with a key from the settings, never stored in clear.

A subscription's signing secret is stored in Redis as a Fernet token (AES-128-CBC with
HMAC-SHA256, from ``cryptography``) made with ``STREAMFUSE_ALERTS__SECRET_KEY``. The key
is a comma-separated list: the first key seals, every key opens, so a key is rotated by
putting the new one first and keeping the old one until every subscription was
re-created. ``streamfuse alerts keygen`` prints a fresh key. Without a key a secret is
refused (closed by default: a clear-text secret would sit in Redis and its dumps). With a
key, webhook and Alertmanager URLs are sealed too (they often carry tokens in the path or
query); Redis keeps only their redacted form in clear.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from streamfuse.alerts.config import AlertSettings
from streamfuse.alerts.errors import InvalidSubscription

KEY_HINT = ("set STREAMFUSE_ALERTS__SECRET_KEY to a key from `streamfuse alerts keygen` (the same key for the "
            "API, the CLI and the dispatcher)")


def generate_key() -> str:
    """A new random key for ``STREAMFUSE_ALERTS__SECRET_KEY``."""
    return Fernet.generate_key().decode()


class SecretBox:
    """Seal and open subscription secrets.

    Args:
        keys: Fernet keys (url-safe base64 of 32 bytes); the first seals, all open.

    Raises:
        InvalidSubscription: a key is not a Fernet key (the message does not repeat it).

    Examples:
        >>> box = SecretBox([generate_key()])
        >>> token = box.seal("hunter2")
        >>> "hunter2" in token, box.open(token)
        (False, 'hunter2')
    """

    def __init__(self, keys: list[str]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k.strip().encode()) for k in keys]) if keys else None
        except (ValueError, TypeError):
            raise InvalidSubscription(f"STREAMFUSE_ALERTS__SECRET_KEY is not a valid key; {KEY_HINT}") from None

    @classmethod
    def from_settings(cls, settings: AlertSettings) -> "SecretBox":
        key = settings.secret_key.get_secret_value() if settings.secret_key is not None else ""
        return cls([k for k in key.split(",") if k.strip()])

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: str) -> str:
        """The token stored in place of ``secret``.

        Raises:
            InvalidSubscription: no key is configured.
        """
        if self._fernet is None:
            raise InvalidSubscription(f"a signing secret cannot be stored without a key; {KEY_HINT}")
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, token: str) -> str:
        """The secret sealed in ``token``.

        Raises:
            InvalidSubscription: no key is configured, or none of the keys opens the token.
        """
        if self._fernet is None:
            raise InvalidSubscription(f"a subscription has a sealed secret but no key is configured; {KEY_HINT}")
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise InvalidSubscription("a subscription's secret was sealed with another key; keep the old key in "
                                      "STREAMFUSE_ALERTS__SECRET_KEY (after the new one) or re-create the "
                                      "subscription") from None
