"""gateway.state: the ``next`` path, ``state`` values, PKCE and the pending login."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import string
import time
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.state import (
    MAX_COOKIE_CHARS,
    MAX_PENDING,
    STATE_TTL_S,
    LoginCookie,
    PendingLogin,
    is_valid_state,
    pkce_pair,
    safe_next,
)

ALNUM = string.ascii_letters + string.digits

# -- safe_next -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "/",
        "/x",
        "/a/b/c",
        "/a/b?c=d&e=f",
        "/search?q=a%20b",  # encoded space in the query stays a query
        "/files/My%20Doc",  # a deep link with an encoded space keeps its target
        "/reports/2024?tab=summary#top",
        "/文档/页面?名字=张三",
        "/%E6%96%87%E6%A1%A3",  # percent-encoded UTF-8
        "/caf%C3%A9",
        "/a%2Fb",  # decodes to /a/b: still one leading slash
        "/a/./b/../c",
        "/%7Euser",
        "/x?next=//evil.com",  # a '//' inside the query is not an authority
        "/x?path=a\\b",  # a backslash in the query does not change the origin
        "/" + "a" * 2047,  # exactly the maximum length
    ],
)
def test_safe_next_keeps_same_origin_paths(raw: str) -> None:
    assert safe_next(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        "x",
        "?x=1",
        "#frag",
        "//x",
        "///x",
        "//evil.com/path",
        "/\\x",
        "/\\\\evil.com",
        "\\\\evil.com",
        "https://x",
        "https://evil.com/",
        "HTTPS://evil.com",
        "http:/x",
        "http:x",
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        " /x",
        "\t/x",
        "\n/x",
        "/\t/evil.com",  # browsers drop tabs and newlines: this is //evil.com
        "/\n/evil.com",
        "/\r/evil.com",
        "/%09/evil.com",
        "/%0a/evil.com",
        "/%2F%2Fevil.com",
        "/%2f%2fevil.com",
        "/%2Fevil.com",
        "/%5Cevil",
        "/%5cevil",
        "/%5C%5Cevil.com",
        "/%252F%252Fevil",
        "/%25252F%25252Fevil",
        "/%252525252F%252525252Fevil",  # deeper than the decoder follows: refused, not trusted
        "/x\r\nSet-Cookie: a=b",
        "/x%0d%0aSet-Cookie:%20a=b",
        "/x?a=%0d%0a",
        "/x\x00",
        "/%00",
        "/x\x7f",
        "/a b",  # a raw space in the path
        "/" + "a" * 2048,  # one over the maximum length
    ],
)
def test_safe_next_replaces_everything_else(raw: str | None) -> None:
    assert safe_next(raw) == "/"


def _decoded_forms(value: str) -> list[str]:
    forms = [value]
    for _ in range(16):
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            return forms
        forms.append(decoded)
    raise AssertionError(f"{value!r} does not stop decoding")


_ATOMS = [
    "/",
    "//",
    "\\",
    "%",
    "%2F",
    "%2f",
    "%5C",
    "%5c",
    "%25",
    "%252F",
    "%09",
    "%0a",
    "%0D",
    "%00",
    ":",
    ".",
    "..",
    "?",
    "#",
    "@",
    " ",
    "\t",
    "\n",
    "a",
    "x",
    "evil.com",
    "https:",
    "javascript:",
    "中",
]
_tricky = st.lists(st.sampled_from(_ATOMS), max_size=12).map("".join)


@settings(max_examples=400)
@given(st.one_of(st.text(), _tricky, _tricky.map(lambda s: "/" + s)))
def test_safe_next_property(raw: str) -> None:
    result = safe_next(raw)
    assert result in ("/", raw)
    for form in _decoded_forms(result):
        assert form == "/" or (form.startswith("/") and form[1] not in "/\\"), form
        parts = urlsplit(form)
        assert parts.scheme == "" and parts.netloc == ""
        assert not any(ord(char) < 0x20 or ord(char) == 0x7F for char in form)


# -- state -----------------------------------------------------------------------------------


COOKIES = LoginCookie(["s" * 32], "gw_session_login")


def test_new_state_is_short_alphanumeric_and_unique() -> None:
    values = [COOKIES.new_state() for _ in range(2000)]
    for value in values:
        assert re.fullmatch(r"[A-Za-z0-9]{1,64}", value)
        assert is_valid_state(value) and COOKIES.issued(value)
    assert len(set(values)) == len(values)


def test_only_issued_states_are_recognised() -> None:
    state = COOKIES.new_state()
    assert not COOKIES.issued(state[:-1] + ("A" if state[-1] != "A" else "B"))
    assert not COOKIES.issued("Unknown1") and not COOKIES.issued("a" * 43)
    assert not LoginCookie(["t" * 32], "gw_session_login").issued(state)  # another secret
    assert LoginCookie(["t" * 32, "s" * 32], "gw_session_login").issued(state)  # rotation
    assert COOKIES.used_key(state).startswith("used-state:") and state not in COOKIES.used_key(state)


@pytest.mark.parametrize("value", ["", "a" * 65, "abc-def", "abc_def", "abc def", "abc\n", "é", "١٢٣", "ＡＢＣ"])
def test_is_valid_state_rejects(value: str) -> None:
    assert not is_valid_state(value)


@pytest.mark.parametrize("value", ["a", "Z9", "a" * 64, "0" * 64])
def test_is_valid_state_accepts(value: str) -> None:
    assert is_valid_state(value)


@given(st.one_of(st.text(), st.text(alphabet=ALNUM, max_size=80)))
def test_is_valid_state_property(value: str) -> None:
    expected = 1 <= len(value) <= 64 and all(char in ALNUM for char in value)
    assert is_valid_state(value) is expected


# -- PKCE ------------------------------------------------------------------------------------


def test_pkce_pair() -> None:
    pairs = [pkce_pair() for _ in range(200)]
    for verifier, challenge in pairs:
        assert 43 <= len(verifier) <= 128
        assert re.fullmatch(r"[A-Za-z0-9\-._~]+", verifier)
        expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).decode().rstrip("=")
        assert challenge == expected
        assert "=" not in challenge and len(challenge) == 43
    assert len({verifier for verifier, _ in pairs}) == len(pairs)


# -- PendingLogin and the login cookie ----------------------------------------------------------


def _pending(created_at: float, next_path: str = "/x?y=1", state: str | None = None) -> PendingLogin:
    return PendingLogin(
        state=state or COOKIES.new_state(),
        provider="lark",
        next_path=next_path,
        code_verifier="v" * 43,
        created_at=created_at,
    )


def test_login_cookie_round_trip() -> None:
    login = _pending(time.time())
    no_pkce = PendingLogin(state=COOKIES.new_state(), provider="wemeet", next_path="/", code_verifier=None,
                           created_at=time.time())
    value = COOKIES.seal({login.state: login, no_pkce.state: no_pkce})
    assert re.fullmatch(r"[A-Za-z0-9_-]+", value)  # a cookie value as it is
    assert COOKIES.open(value) == {login.state: login, no_pkce.state: no_pkce}
    assert "/x?y=1" not in value and login.state not in value  # sealed, not just encoded


@pytest.mark.parametrize("value", [None, "", "abc", "A" * 5000, "!!", "AQAAAA"])
def test_a_bad_login_cookie_holds_nothing(value: str | None) -> None:
    assert COOKIES.open(value) == {}


def test_a_login_cookie_opens_only_for_its_purpose_and_secrets() -> None:
    login = _pending(time.time())
    value = COOKIES.seal({login.state: login})
    assert LoginCookie(["t" * 32], "gw_session_login").open(value) == {}
    assert LoginCookie(["s" * 32], "other_login").open(value) == {}
    assert LoginCookie(["t" * 32, "s" * 32], "gw_session_login").open(value) == {login.state: login}
    tampered = value[:-2] + ("AA" if value[-2:] != "AA" else "BB")
    assert COOKIES.open(tampered) == {}


def test_the_login_cookie_keeps_the_newest_logins_within_its_size() -> None:
    now = time.time()
    logins = {entry.state: entry for entry in (_pending(now - index) for index in range(10))}
    kept = COOKIES.open(COOKIES.seal(logins))
    assert len(kept) == MAX_PENDING
    assert sorted(kept.values(), key=lambda e: -e.created_at) == sorted(logins.values(),
                                                                      key=lambda e: -e.created_at)[:MAX_PENDING]
    # Long next paths: fewer of them, the newest first, the cookie under the limit.
    long = {entry.state: entry for entry in (_pending(now - index, "/" + "x" * 2000) for index in range(4))}
    value = COOKIES.seal(long)
    assert len(value) <= MAX_COOKIE_CHARS and 1 <= len(COOKIES.open(value)) < 4
    # A next path that cannot fit alone still leaves a login (going to /).
    huge = _pending(now, "/" + "é" * 2000)
    assert COOKIES.open(COOKIES.seal({huge.state: huge}))[huge.state].next_path == "/"
    # Expired logins are dropped; none left: no cookie.
    old = _pending(now - STATE_TTL_S - 1)
    assert COOKIES.seal({old.state: old}) == ""


def test_pending_login_expiry() -> None:
    assert STATE_TTL_S == 600
    login = _pending(1000.0)
    assert not login.expired(now=1000.0)
    assert not login.expired(now=1000.0 + STATE_TTL_S)
    assert login.expired(now=1000.0 + STATE_TTL_S + 0.5)
    assert not _pending(time.time()).expired()
    assert _pending(time.time() - STATE_TTL_S - 1).expired()
    # An explicit clock of 0 is a time, not "no clock".
    assert not _pending(0.0).expired(now=0.0)


def test_a_consent_login_keeps_its_scopes_and_a_plain_one_seals_as_before() -> None:
    consent = PendingLogin(state=COOKIES.new_state(), provider="dingtalk", next_path="/app", code_verifier=None,
                           created_at=time.time(), extra_scopes=("Contact.User.Read", "app:qyapi_base"))
    plain = _pending(time.time())
    opened = COOKIES.open(COOKIES.seal({consent.state: consent, plain.state: plain}))
    assert opened[consent.state].extra_scopes == ("Contact.User.Read", "app:qyapi_base")
    assert opened[consent.state].is_consent and not opened[plain.state].is_consent
    # A cookie sealed before consent existed (five fields a login) still opens.
    five = json.dumps([[plain.state, "lark", "/", None, plain.created_at]]).encode()
    old = COOKIES._sealer.seal(COOKIES._purpose, five)
    value = base64.urlsafe_b64encode(old).rstrip(b"=").decode()
    assert COOKIES.open(value)[plain.state].extra_scopes == ()
    # Anything else in the sixth field is a damaged cookie: nothing opens.
    bad = COOKIES._sealer.seal(COOKIES._purpose, json.dumps([[plain.state, "lark", "/", None, 1.0, "x"]]).encode())
    assert COOKIES.open(base64.urlsafe_b64encode(bad).rstrip(b"=").decode()) == {}


def test_the_largest_consent_consent_allows_still_fits_the_cookie() -> None:
    from gateway.consent import MAX_SCOPE_CHARS, MAX_SCOPES

    scopes = tuple(f"app:{index:02d}" + "x" * (MAX_SCOPE_CHARS - 2) for index in range(MAX_SCOPES))
    login = PendingLogin(state=COOKIES.new_state(), provider="lark", next_path="/" + "n" * 2000, code_verifier="v" * 64,
                         created_at=time.time(), extra_scopes=scopes)
    value = COOKIES.seal({login.state: login})
    assert len(value) <= MAX_COOKIE_CHARS
    assert COOKIES.open(value)[login.state].extra_scopes == scopes  # next went to "/" rather than the login
