"""The cache of verified sessions (gateway/auth.py): its sweep, its bound and its two indexes.

The end-to-end behaviour (a cached session skips the store, logout and a new login reach every
replica) is in tests/test_middleware.py and tests/test_replicas.py.
"""

from __future__ import annotations

import pytest

from gateway import auth as auth_module
from gateway.auth import Authenticated, _digest, _VerifiedSessions
from gateway.identity import Identity
from gateway.providers import TokenSet
from gateway.sessions import SessionRecord
from tests.conftest import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(1_700_000_000.0)
    monkeypatch.setattr(auth_module.time, "time", clock)
    return clock


def _entry(sid: str, user: str, loaded_at: float) -> Authenticated:
    record = SessionRecord(sid=sid, provider="lark", user=user, tenant="t", name="", created_at=loaded_at,
                           expires_at=loaded_at + 3600)
    return Authenticated(record=record, identity=Identity(provider="lark", user=user, tenant="t", name=""),
                         tokens=TokenSet(access_token="a", expires_at=loaded_at + 7200), headers=[],
                         renew_at=loaded_at + 10, loaded_at=loaded_at)


def test_entries_older_than_the_ttl_are_swept_with_their_index_entries(clock: Clock) -> None:
    cache = _VerifiedSessions(ttl_s=10)
    cache.put("cookie-1", _entry("s1", "u1", clock.now))
    clock.now += 5
    cache.put("cookie-2", _entry("s2", "u2", clock.now))
    clock.now += 6  # cookie-1 is 11 s old, cookie-2 6 s: the next put sweeps only cookie-1
    cache.put("cookie-3", _entry("s3", "u3", clock.now))
    assert list(cache.entries) == ["cookie-2", "cookie-3"]
    assert _digest("s1") not in cache._by_session
    assert _digest("tok:lark:t:u1") not in cache._by_token_key


def test_past_the_bound_the_entry_stored_longest_ago_goes_first(clock: Clock) -> None:
    cache = _VerifiedSessions(ttl_s=60, max_entries=2)
    cache.put("cookie-1", _entry("s1", "u1", clock.now))
    cache.put("cookie-2", _entry("s2", "u2", clock.now))
    cache.put("cookie-1", _entry("s1", "u1", clock.now))  # renewed: now the newest
    cache.put("cookie-3", _entry("s3", "u3", clock.now))
    assert list(cache.entries) == ["cookie-1", "cookie-3"]
    assert set(cache._by_session) == {_digest("s1"), _digest("s3")}


def test_a_broadcast_drops_the_session_or_every_session_of_the_token_record(clock: Clock) -> None:
    cache = _VerifiedSessions(ttl_s=60)
    cache.put("phone", _entry("s1", "u1", clock.now))
    cache.put("laptop", _entry("s2", "u1", clock.now))  # same user: same token record
    cache.put("other", _entry("s3", "u2", clock.now))
    cache.drop_session(_digest("s1"))
    assert list(cache.entries) == ["laptop", "other"]
    cache.drop_token_key(_digest("tok:lark:t:u1"))
    assert list(cache.entries) == ["other"]
    assert set(cache._by_token_key) == {_digest("tok:lark:t:u2")}
    cache.drop_session(_digest("unknown"))
    cache.drop_token_key(_digest("unknown"))
    assert list(cache.entries) == ["other"]


def test_every_cookie_string_of_a_session_is_dropped_when_it_ends(clock: Clock) -> None:
    # One session can reach the cache under two strings (pyjwt also accepts a padded ticket):
    # dropping one of them must not unlink the other from the logout broadcast.
    cache = _VerifiedSessions(ttl_s=60)
    cache.put("ticket", _entry("s1", "u1", clock.now))
    cache.put("ticket=", _entry("s1", "u1", clock.now))
    cache.drop("ticket")
    cache.drop_session(_digest("s1"))
    assert cache.entries == {}


def test_a_renewal_that_raced_a_broadcast_is_not_cached(clock: Clock) -> None:
    cache = _VerifiedSessions(ttl_s=60)
    started = cache.generation
    cache.drop_session(_digest("s1"))  # the session ended while the renewal was loading it
    cache.put("cookie-1", _entry("s1", "u1", clock.now), generation=started)
    assert cache.entries == {}
    cache.put("cookie-1", _entry("s1", "u1", clock.now), generation=cache.generation)
    assert list(cache.entries) == ["cookie-1"]


def test_renewing_a_cached_cookie_in_a_full_cache_evicts_nothing(clock: Clock) -> None:
    cache = _VerifiedSessions(ttl_s=60, max_entries=2)
    cache.put("cookie-1", _entry("s1", "u1", clock.now))
    cache.put("cookie-2", _entry("s2", "u2", clock.now))
    cache.put("cookie-1", _entry("s1", "u1", clock.now))
    assert list(cache.entries) == ["cookie-2", "cookie-1"]


def test_a_sweep_goes_a_batch_at_a_time(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "_SWEEP_BATCH", 3)
    cache = _VerifiedSessions(ttl_s=10)
    for index in range(7):
        cache.put(f"old-{index}", _entry(f"s{index}", f"u{index}", clock.now))
    clock.now += 11
    cache.put("new-1", _entry("n1", "v1", clock.now))
    assert len(cache.entries) == 5  # 3 swept; the next put goes on at once
    cache.put("new-2", _entry("n2", "v2", clock.now))
    cache.put("new-3", _entry("n3", "v3", clock.now))
    assert sorted(cache.entries) == ["new-1", "new-2", "new-3"]
