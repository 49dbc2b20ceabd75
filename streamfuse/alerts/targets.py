"""Receiver URL safety: which URLs the dispatcher may send to.

Rules, checked at subscription time and again before every request (DNS may change):

* ``http`` or ``https`` only; a host is required; no ``user:password@`` in the URL;
* link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata endpoints
  (169.254.169.254, fd00:ec2::254, 100.100.100.200, metadata.google.internal, ...) are
  always refused, as are unspecified, multicast and reserved addresses;
* loopback and private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, ...) are
  refused unless ``STREAMFUSE_ALERTS__ALLOW_PRIVATE_TARGETS=true``;
* a host name is resolved and *every* address it resolves to must pass.

Redirects are never followed (see :mod:`streamfuse.alerts.delivery`), so a public URL
cannot bounce a request to a private one.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

from streamfuse.alerts.errors import (
    CredentialsInUrl,
    LinkLocalTarget,
    MissingHost,
    PrivateTarget,
    ReservedTarget,
    UnresolvableTarget,
    UnsupportedScheme,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Iterable[str]]

METADATA_HOSTS = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
    "metadata.azure.internal", "metadata.tencentyun.com",
})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "fd00:ec2::254", "100.100.100.200", "192.0.0.192",
))
PRIVATE_HINT = "set STREAMFUSE_ALERTS__ALLOW_PRIVATE_TARGETS=true to allow private and loopback receivers"


def redact(url: str) -> str:
    """``scheme://host[:port]`` only: paths and queries often hold tokens, so logs show no more.

    Examples:
        >>> redact("https://user:pw@hooks.example.com:8443/T0/B1/XyZ?token=abc")
        'https://hooks.example.com:8443/...'
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}/..."


def default_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (blocking getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_address(address: str | IPAddress, url: str, allow_private: bool) -> None:
    """Refuse an address the dispatcher must not send to.

    Raises:
        LinkLocalTarget, ReservedTarget, PrivateTarget: see the module's rules.

    Examples:
        >>> check_address("8.8.8.8", "http://x/", allow_private=False)
        >>> check_address("10.1.2.3", "http://x/", allow_private=True)
        >>> check_address("169.254.169.254", "http://x/", allow_private=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        streamfuse.alerts.errors.LinkLocalTarget: refused receiver URL http://x/: ... a cloud metadata endpoint; ...
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        raise LinkLocalTarget(url, f"{ip} is a cloud metadata endpoint; receivers there are never allowed")
    if ip.is_link_local:
        raise LinkLocalTarget(url, f"{ip} is link-local (169.254.0.0/16, fe80::/10); receivers there are never "
                                   "allowed")
    if ip.is_unspecified or ip.is_multicast or (ip.is_reserved and not ip.is_loopback):
        raise ReservedTarget(url, f"{ip} is an unspecified, multicast or reserved address")
    if not ip.is_global and not allow_private:
        kind = "loopback" if ip.is_loopback else "private"
        raise PrivateTarget(url, f"{ip} is a {kind} address; {PRIVATE_HINT}")


def validate_url(url: str, allow_private: bool = False, resolve: Resolver | None = default_resolver) -> str:
    """Check a webhook or Alertmanager URL; return it normalized (scheme and host lower-case).

    Args:
        url: the receiver URL.
        allow_private: accept loopback and private addresses.
        resolve: ``(host, port) -> addresses``; ``None`` skips resolution (syntax checks only).

    Raises:
        UnsupportedScheme, CredentialsInUrl, MissingHost, LinkLocalTarget, ReservedTarget,
        PrivateTarget, UnresolvableTarget: each a :class:`~streamfuse.alerts.errors.UnsafeTarget`.

    Examples:
        >>> validate_url("HTTPS://Hooks.Example.com/x", resolve=lambda h, p: ["93.184.215.14"])
        'https://hooks.example.com/x'
        >>> validate_url("ftp://hooks.example.com/x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        streamfuse.alerts.errors.UnsupportedScheme: refused receiver URL ...: scheme 'ftp' is not allowed; ...
    """
    shown = redact(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise MissingHost(shown, f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsupportedScheme(shown, f"scheme {parts.scheme!r} is not allowed; use http or https")
    if parts.username is not None or parts.password is not None:
        raise CredentialsInUrl(shown, "credentials in the URL are not allowed (they would be stored and logged); "
                                      "use --secret for request signing")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise MissingHost(shown, "the URL has no host")
    if host in METADATA_HOSTS:
        raise LinkLocalTarget(shown, f"{host} is a cloud metadata endpoint; receivers there are never allowed")
    _check_host(host, port or (443 if scheme == "https" else 80), shown, allow_private, resolve)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def _check_host(host: str, port: int, shown: str, allow_private: bool, resolve: Resolver | None) -> None:
    """An address literal is checked as it is; a name, every address it resolves to."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_address(literal, shown, allow_private)
        return
    if resolve is None:
        return
    try:
        addresses = list(resolve(host, port))
    except (OSError, UnicodeError) as exc:
        raise UnresolvableTarget(shown, f"host {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise UnresolvableTarget(shown, f"host {host!r} resolves to no address")
    for a in addresses:
        check_address(a, shown, allow_private)
