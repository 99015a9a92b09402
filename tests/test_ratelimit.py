"""gateway.ratelimit (issue 10, findings 7 and 10): token buckets per client address, bounded memory,
and the client address believed from X-Forwarded-For only behind a trusted proxy."""

from __future__ import annotations

from typing import Any

from gateway.edge import TrustedProxies
from gateway.ratelimit import RateLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {"type": "http", "client": (peer, 1234) if peer else None,
            "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(30, 3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    wait = limiter.take("a")
    assert wait == 2  # 30 a minute: one every 2 s
    assert limiter.take("b") == 0  # another client has its own bucket
    clock.now += 2
    assert limiter.take("a") == 0 and limiter.take("a") > 0
    clock.now += 3600  # an idle bucket is full again (and forgotten)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]


def test_a_zero_rate_is_no_limit() -> None:
    limiter = RateLimiter(0, 1)
    assert all(limiter.take("a") == 0 for _ in range(1000))


def test_memory_is_bounded() -> None:
    limiter = RateLimiter(30, 3, max_clients=100)
    for index in range(10_000):
        limiter.take(f"client{index}")
    assert len(limiter._buckets) <= 100


def test_the_client_is_the_peer_unless_a_trusted_proxy_forwards() -> None:
    nobody = TrustedProxies([])
    proxies = TrustedProxies(["10.0.0.0/8", "::1/128"])
    assert client_key(scope("203.0.113.7"), nobody) == "203.0.113.7"
    # X-Forwarded-For from anyone else is the client's own writing.
    assert client_key(scope("203.0.113.7", "198.51.100.1"), nobody) == "203.0.113.7"
    assert client_key(scope("203.0.113.7", "198.51.100.1"), proxies) == "203.0.113.7"
    # Behind our proxies: the nearest address that is not one of them.
    assert client_key(scope("10.0.0.2", "198.51.100.1"), proxies) == "198.51.100.1"
    assert client_key(scope("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.9"), proxies) == "198.51.100.1"
    assert client_key(scope("10.0.0.2", "1.2.3.4", "198.51.100.1"), proxies) == "198.51.100.1"
    assert client_key(scope("10.0.0.2"), proxies) == "10.0.0.2"
    assert client_key(scope("::ffff:10.0.0.2", "198.51.100.1"), proxies) == "198.51.100.1"
    # IPv6 clients count per /64; no peer at all (a test transport) is one bucket.
    assert client_key(scope("2001:db8:1:2:aaaa::1"), nobody) == client_key(scope("2001:db8:1:2:bbbb::9"), nobody)
    assert client_key(scope("2001:db8:1:2::1"), nobody) != client_key(scope("2001:db8:1:3::1"), nobody)
    assert client_key(scope(None), nobody) == "unknown"
    assert client_key(scope("not-an-ip"), nobody) == "not-an-ip"
