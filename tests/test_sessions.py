"""gateway.sessions: the signed cookie ticket and the server-side session record."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sessions as sessions_module
from gateway.sealing import derive_key
from gateway.sessions import CookieCodec, SessionRecord, SessionStore
from gateway.stores.memory import MemoryStore

OLD = "old-secret-0123456789-0123456789-abcdef"
NEW = "new-secret-9876543210-9876543210-fedcba"
OTHER = "other-secret-xxxxxxxxxxxxxxxxxxxxxxxxxxxx"


def _kid(secret: str) -> str:
    """The kid the codec issues: derived from the secret under its own label (tests/test_keys.py)."""
    return base64.urlsafe_b64encode(derive_key(secret, b"gateway session cookie kid v1", 9)).decode()


def _key(secret: str) -> bytes:
    """The HS256 key the codec signs with: derived from the secret, never the secret itself."""
    return derive_key(secret, b"gateway session cookie v1")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _ticket(codec: CookieCodec, sid: str = "sid-1", lifetime: float = 3600) -> str:
    now = time.time()
    return codec.encode(sid, issued_at=now, expires_at=now + lifetime)


# -- CookieCodec -----------------------------------------------------------------------------


def test_round_trip() -> None:
    codec = CookieCodec([NEW])
    now = time.time()
    ticket = codec.encode("abc", issued_at=now, expires_at=now + 60)
    assert codec.decode(ticket) == ("abc", float(int(now + 60)))
    header = jwt.get_unverified_header(ticket)
    assert header["alg"] == "HS256" and header["kid"] == _kid(NEW)
    claims = jwt.decode(ticket, _key(NEW), algorithms=["HS256"])
    assert set(claims) == {"sid", "iat", "exp"}  # nothing about the user travels in the cookie


def test_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        CookieCodec([])


def test_rotation_old_secret_still_verifies_while_listed() -> None:
    before = CookieCodec([OLD])
    old_ticket = _ticket(before, "s-old")
    rotated = CookieCodec([NEW, OLD])
    assert rotated.decode(old_ticket) == before.decode(old_ticket)
    new_ticket = _ticket(rotated, "s-new")
    assert jwt.get_unverified_header(new_ticket)["kid"] == _kid(NEW)  # the first secret signs
    assert rotated.decode(new_ticket) is not None
    assert before.decode(new_ticket) is None  # the old-only codec never learnt NEW
    retired = CookieCodec([NEW])
    assert retired.decode(old_ticket) is None
    assert retired.decode(new_ticket) is not None


def test_wrong_secret_with_a_known_kid_is_rejected() -> None:
    codec = CookieCodec([NEW])
    forged = jwt.encode(
        {"sid": "victim", "iat": int(time.time()), "exp": int(time.time()) + 60},
        OTHER,
        algorithm="HS256",
        headers={"kid": _kid(NEW)},
    )
    assert codec.decode(forged) is None


def test_alg_none_is_rejected() -> None:
    codec = CookieCodec([NEW])
    now = int(time.time())
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": _kid(NEW)}).encode())
    payload = _b64(json.dumps({"sid": "victim", "iat": now, "exp": now + 60}).encode())
    assert codec.decode(f"{header}.{payload}.") is None
    # Same claims, alg swapped in the header of an otherwise genuine ticket.
    genuine = _ticket(codec, "victim")
    _, body, signature = genuine.split(".")
    assert codec.decode(f"{header}.{body}.{signature}") is None
    assert codec.decode(f"{header}.{body}.") is None


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_other_hmac_algorithms_are_rejected() -> None:
    codec = CookieCodec([NEW])
    now = int(time.time())
    hs512 = jwt.encode({"sid": "x", "exp": now + 60}, _key(NEW), algorithm="HS512", headers={"kid": _kid(NEW)})
    assert codec.decode(hs512) is None


def test_tampered_ticket_is_rejected() -> None:
    codec = CookieCodec([NEW])
    ticket = _ticket(codec, "mine")
    header, payload, signature = ticket.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sid"] = "someone-else"
    other_payload = _b64(json.dumps(claims).encode())
    assert codec.decode(f"{header}.{other_payload}.{signature}") is None
    claims["sid"], claims["exp"] = "mine", claims["exp"] + 10**6  # extend the expiry
    assert codec.decode(f"{header}.{_b64(json.dumps(claims).encode())}.{signature}") is None
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    assert codec.decode(f"{header}.{payload}.{flipped}") is None
    assert codec.decode(f"{header}.{payload}") is None
    assert codec.decode(ticket + "x") is None


def test_expired_ticket_is_rejected() -> None:
    codec = CookieCodec([NEW])
    now = time.time()
    assert codec.decode(codec.encode("s", issued_at=now - 120, expires_at=now - 60)) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"iat": 1, "exp": 2**40},  # no sid
        {"sid": "", "exp": 2**40},
        {"sid": 42, "exp": 2**40},
        {"sid": "s"},  # no exp
        {"sid": "s", "exp": "tomorrow"},
    ],
)
def test_genuinely_signed_but_malformed_claims_are_rejected(claims: dict[str, object]) -> None:
    ticket = jwt.encode(claims, _key(NEW), algorithm="HS256", headers={"kid": _kid(NEW)})
    assert CookieCodec([NEW]).decode(ticket) is None


@pytest.mark.parametrize("ticket", ["", ".", "..", "a.b.c", "null", "e30.e30.", "eyJhbGciOiJIUzI1NiJ9.e30.xx"])
def test_garbage_is_rejected(ticket: str) -> None:
    assert CookieCodec([NEW]).decode(ticket) is None


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet="abcXYZ019-_.=", max_size=200)))
def test_any_text_decodes_to_none_without_raising(ticket: str) -> None:
    assert CookieCodec([NEW, OLD]).decode(ticket) is None


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=40))
def test_payload_swaps_never_verify(fake_payload: str) -> None:
    codec = CookieCodec([NEW])
    header, payload, signature = _ticket(codec, "mine").split(".")
    if fake_payload != payload:
        assert codec.decode(f"{header}.{fake_payload}.{signature}") is None


# -- SessionStore ----------------------------------------------------------------------------


@pytest.fixture
def store() -> SessionStore:
    return SessionStore(MemoryStore(), CookieCodec([NEW]), max_age_s=3600)


async def _create(sessions: SessionStore) -> tuple[str, SessionRecord]:
    return await sessions.create(provider="lark", user="ou_1", tenant="t1", name="张三\n")


async def test_create_and_load(store: SessionStore) -> None:
    before = time.time()
    cookie, record = await _create(store)
    assert record.provider == "lark" and record.user == "ou_1" and record.tenant == "t1" and record.name == "张三\n"
    assert record.token_key == "tok:lark:t1:ou_1"
    assert int(before) <= record.created_at <= time.time()  # whole seconds
    assert record.expires_at == pytest.approx(record.created_at + 3600)
    assert await store.load(cookie) == record
    assert store.codec.decode(cookie) == (record.sid, float(int(record.expires_at)))


async def test_each_session_is_distinct(store: SessionStore) -> None:
    first, one = await _create(store)
    second, two = await _create(store)
    assert one.sid != two.sid and first != second
    await store.end(one.sid)
    assert await store.load(first) is None
    assert await store.load(second) == two


async def test_ended_session_kills_its_cookie(store: SessionStore) -> None:
    cookie, record = await _create(store)
    await store.end(record.sid)
    assert store.codec.decode(cookie) is not None  # the ticket itself is still well signed...
    assert await store.load(cookie) is None  # ...but nothing stands behind it any more
    await store.end(record.sid)  # ending twice is harmless


async def test_load_rejects_bad_cookies(store: SessionStore) -> None:
    cookie, _ = await _create(store)
    assert await store.load("garbage") is None
    assert await store.load(cookie[:-2]) is None
    other = SessionStore(store.store, CookieCodec([OTHER]), max_age_s=3600)
    assert await other.load(cookie) is None


async def test_max_age_is_enforced_server_side(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    cookie, record = await _create(store)
    # A ticket for the same sid whose own exp is far beyond max_age (say, signed before max_age shrank).
    long_lived = store.codec.encode(record.sid, issued_at=time.time(), expires_at=time.time() + 10 * 365 * 86400)
    assert await store.load(long_lived) == record
    real_time = time.time
    monkeypatch.setattr(sessions_module.time, "time", lambda: real_time() + 3601)
    assert store.codec.decode(long_lived) is not None  # pyjwt still finds the ticket unexpired
    assert await store.load(long_lived) is None
    assert await store.load(cookie) is None


class _RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.ttls: dict[str, float] = {}

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.ttls[key] = ttl_s
        await super().set(key, value, ttl_s)


async def test_store_ttl_follows_max_age() -> None:
    backend = _RecordingStore()
    sessions = SessionStore(backend, CookieCodec([NEW]), max_age_s=7200)
    _, record = await _create(sessions)
    assert backend.ttls == {f"sess:{record.sid}": 7200}  # the store forgets the record when it ends


def test_record_round_trip_keeps_unicode() -> None:
    record = SessionRecord(
        sid="s",
        provider="dingtalk",
        user="u",
        tenant="",
        name="王五 \r\n",
        created_at=1.0,
        expires_at=2.0,
    )
    assert SessionRecord.from_bytes("s", record.to_bytes()) == record
    assert record.token_key == "tok:dingtalk::u"


def test_record_is_stored_without_what_its_key_already_says() -> None:
    record = SessionRecord(sid="sid-1", provider="lark", user="ou_1", tenant="t1", name="张三",
                           created_at=1700000000.0, expires_at=1700604800.0)
    assert record.to_bytes() == '["lark","ou_1","t1","张三",1700000000,1700604800]'.encode()


def test_a_record_written_by_an_older_version_still_loads() -> None:
    legacy = (b'{"sid":"sid-1","provider":"lark","user":"ou_1","tenant":"t1","name":"x",'
              b'"token_key":"tok:lark:t1:ou_1","created_at":1.5,"expires_at":2.5}')
    record = SessionRecord.from_bytes("sid-1", legacy)
    assert (record.sid, record.user, record.token_key, record.expires_at) == ("sid-1", "ou_1", "tok:lark:t1:ou_1", 2.5)


async def test_a_new_session_is_stored_as_the_previous_version_reads_it(store: SessionStore) -> None:
    """Six fields, nothing after them: a replica of the previous version unpacks exactly six, so
    a session created here authenticates there during a rolling upgrade (docs/deployment.md)."""
    _, record = await _create(store)
    stored = json.loads(await store.store.get(f"sess:{record.sid}") or b"null")
    provider, user, tenant, name, created_at, expires_at = stored  # the previous version's parse
    assert (provider, user, tenant, name, created_at, expires_at) == (
        "lark", "ou_1", "t1", "张三\n", int(record.created_at), int(record.expires_at))


@pytest.mark.parametrize("later", [
    ["browser"],  # a seventh field, say the sign-in's flow
    [None, {"later": 1}],
    ["a later field", 7, [1, 2]],
])
async def test_a_record_written_by_a_later_version_loads_with_its_extra_fields_skipped(
        store: SessionStore, later: list[object]) -> None:
    now = int(time.time())
    stored = json.dumps(["lark", "ou_1", "t1", "x", now, now + 3600, *later]).encode()
    await store.store.set("sess:sid-later", stored, 3600)
    record = await store.load(store.codec.encode("sid-later", issued_at=now, expires_at=now + 3600))
    assert record == SessionRecord(sid="sid-later", provider="lark", user="ou_1", tenant="t1", name="x",
                                   created_at=float(now), expires_at=float(now + 3600))
    assert record.to_bytes() == json.dumps(["lark", "ou_1", "t1", "x", now, now + 3600],
                                           separators=(",", ":")).encode()  # written back as six
