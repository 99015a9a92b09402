"""gateway/http1.py's small parts beside the client the sidecar and relay tests drive on real
sockets (tests/test_proxy_hostile.py, tests/test_relay_*.py)."""

from __future__ import annotations

import httpx

from gateway.http1 import HOP_BY_HOP, HeaderView, hop_by_hop


def test_a_header_view_reads_as_httpx_headers_do() -> None:
    raw = [(b"Retry-After", b"3"), (b"x-ogw-ratelimit-reset", b"7"), (b"Vary", b"Accept"), (b"vary", b"Origin")]
    view, reference = HeaderView(raw), httpx.Headers(raw)
    for name in ("retry-after", "RETRY-AFTER", "X-Ogw-RateLimit-Reset", "vary"):
        assert view[name] == reference[name]
    assert view.get("absent", "") == reference.get("absent", "") == ""
    assert sorted(view) == ["retry-after", "vary", "x-ogw-ratelimit-reset"] and len(view) == 3


def test_a_header_view_decodes_nothing_until_asked() -> None:
    class Pairs(list[tuple[bytes, bytes]]):
        reads = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            type(self).reads += 1
            return super().__iter__()

    pairs = Pairs([(b"content-type", b"application/json")])
    view = HeaderView(pairs)
    assert Pairs.reads == 0
    assert view.get("Content-Type") == "application/json" and view.get("x") is None
    assert Pairs.reads == 1  # decoded once, then looked up


def test_hop_by_hop_adds_what_connection_names() -> None:
    assert hop_by_hop([(b"content-type", b"text/plain")]) is HOP_BY_HOP
    listed = hop_by_hop([(b"connection", b"close, X-Auth-User"), (b"connection", b" keep-alive")])
    assert {b"x-auth-user", b"close", b"keep-alive"} <= listed and listed >= HOP_BY_HOP
