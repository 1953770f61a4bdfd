"""Completion callbacks: where they may go, and how receivers can trust them.

A callback body is signed like Stripe's webhooks: `X-Fineprune-Signature: t=<unix>,v1=<hex>`
where the hex is HMAC-SHA256(secret, f"{t}.{body}"); receivers recompute it and reject old
timestamps, which stops both forgery and replay.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Fineprune-Signature"
MAX_URL_LENGTH = 2048


class CallbackRefused(ValueError):
    """The URL cannot be called: wrong scheme, no host, or a private address."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for `body`."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance: float = 300.0) -> bool:
    """What a receiver does: check the MAC and that the timestamp is recent."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - t) > tolerance:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def check_url_syntax(url: str) -> str:
    """Refuse, at submit time, URLs that could never be called."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials")
    return url


def check_url_target(url: str, allow_private: bool) -> None:
    """Refuse, at delivery time, hosts that resolve to internal addresses (SSRF)."""
    check_url_syntax(url)
    if allow_private:
        return
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise CallbackRefused(f"callback host does not resolve: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise CallbackRefused(f"callback host resolves to a non-public address ({address})")
