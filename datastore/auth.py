"""Who a call comes from: the bearer-token check and the client identity that per-client caps count by.

The token check compares SHA-256 digests of the presented and the expected token with
``hmac.compare_digest``: its time depends on neither the bytes nor the length of the presented value, so
timing tells an attacker nothing about how much of a guess was right.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Optional, Union

SCHEME = b"Bearer "


def bearer_matches(value: Union[str, bytes], token: str) -> bool:
    """Whether an ``authorization`` metadata value is ``Bearer <token>`` (constant time in the value)."""
    v = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    presented = v[len(SCHEME):] if v.startswith(SCHEME) else b""
    ok = hmac.compare_digest(hashlib.sha256(presented).digest(), hashlib.sha256(token.encode()).digest())
    return ok and v.startswith(SCHEME) and bool(token)


def has_bearer(metadata: Optional[Iterable[tuple]], token: Optional[str]) -> bool:
    """Whether the call's ``metadata`` ((key, value) pairs) carries ``authorization: Bearer <token>``; the
    first ``authorization`` entry counts (gRPC keeps repeated keys in order)."""
    if not token:
        return False
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_matches(value, token)
    return False


def client_identity(peer: Optional[str]) -> str:
    """The client a call counts against for per-client caps: its address without the port
    (``ipv4:10.0.0.7:53124`` -> ``ipv4:10.0.0.7``, ``ipv6:[::1]:5000`` -> ``ipv6:[::1]``), else the peer string
    as gRPC gives it (``unix:...``). A token is shared by all clients, so it names none of them."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return f"{kind}:{host}"
    return peer
