"""A per-client limit on the anonymous sign-in endpoints (``/login``, ``/exchange``, ``/callback``).

Each of them costs something: a sealed login cookie, a provider token call, a store write at
redemption. A token bucket per client address (in process, per replica) bounds what one client
can make the gateway do; memory is bounded too (at most ``max_clients`` buckets, an idle bucket is
full again after ``burst / rate`` and is simply forgotten).

The client address is the TCP peer, or the nearest address in ``X-Forwarded-For`` that is not one
of ``access.trusted_proxies`` (``gateway.edge.TrustedProxies``) when the peer is one of them. IPv6
clients are counted per /64 (one subscriber's usual allocation), else every address of it would
get a fresh bucket.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Container

from cachetools import TTLCache
from starlette.types import Scope


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(scope: Scope, trusted: Container[str]) -> str:
    """Whom to count a request against: the client's address (IPv6: its /64)."""
    peer = scope["client"][0] if scope.get("client") else ""
    if peer and peer in trusted:
        forwarded = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
        # Right to left: the addresses our proxies appended are believed, the first one that is
        # not a trusted proxy is the client (anything left of it the client may have written).
        for hop in reversed(",".join(forwarded).split(",")):
            hop = hop.strip()
            if hop and hop not in trusted:
                peer = hop
                break
    address = _address(peer)
    if address is None:
        return peer or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class RateLimiter:
    """Token buckets by key: ``rate_per_min`` tokens a minute, at most ``burst`` saved up."""

    def __init__(self, rate_per_min: float, burst: int, *, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = rate_per_min > 0
        self._rate_s = rate_per_min / 60
        self._burst = float(burst)
        self._clock = clock
        refill_s = burst / self._rate_s if self.enabled else 1.0
        # key -> (tokens, at): an entry idle for refill_s is a full bucket, the same as none.
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(max_clients, refill_s, timer=clock)

    def take(self, key: str) -> int:
        """0 when ``key`` may go ahead (one token taken), else the seconds until it may."""
        if not self.enabled:
            return 0
        now = self._clock()
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate_s)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self._rate_s))
        self._buckets[key] = (tokens - 1, now)
        return 0
