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
