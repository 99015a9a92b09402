"""Issue 10, finding 14: the keys. A separate identity key when ``identity.signing_key_file`` is set
(created there when missing), a cookie ``kid`` that says nothing about the secret, placeholder
secrets refused, and the ``__Host-`` / ``__Secure-`` cookie prefixes usable (and checked)."""

from __future__ import annotations

import hashlib
import stat
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.config import ConfigFileError, build_config
from gateway.identity import derive_signing_key, load_signing_key
from gateway.sessions import CookieCodec
from tests.conftest import GatewayStarter

SECRET = "Kd83-vQz1LmX0pR7sTfW2yHc9BnE4aGj6uYo5iN"


def _raw(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,  # type: ignore[attr-defined]
                             serialization.NoEncryption())


def _errors(session: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigFileError) as caught:
        build_config({"session": session})
    return dict(caught.value.errors)


# -- the identity key file -------------------------------------------------------------------------


def test_a_missing_signing_key_file_is_created_0600_with_a_key_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    key = load_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _raw(key) != _raw(derive_signing_key(SECRET))  # owes nothing to the session secret
    assert _raw(load_signing_key(path)) == _raw(key)  # the next start (or replica) loads the same key
    assert [p.name for p in tmp_path.iterdir()] == ["identity.pem"]  # nothing left aside


def test_an_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    first = load_signing_key(path)
    before = path.read_bytes()
    for _ in range(3):
        assert _raw(load_signing_key(path)) == _raw(first)
    assert path.read_bytes() == before


def test_replicas_starting_together_end_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    barrier = threading.Barrier(8)
    keys: list[bytes] = []

    def start() -> None:
        barrier.wait()
        keys.append(_raw(load_signing_key(path)))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.pem"]


async def test_the_gateway_signs_with_the_file_key_not_the_secret(start_gateway: GatewayStarter,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.pem"
    path.parent.mkdir()
    async with start_gateway(identity={"signing_key_file": str(path)}) as running, running.client() as client:
        jwks = (await client.get("/_gateway/jwks.json")).json()
        secret = running.config.session.secrets[0].get_secret_value()
    assert path.exists()
    public = load_signing_key(path).public_key()
    (published,) = jwks["keys"]
    assert jwt.PyJWK(published).key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == \
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    derived = derive_signing_key(secret).public_key()
    assert derived.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != \
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- the cookie kid ----------------------------------------------------------------------------------


def test_the_cookie_names_its_key_without_hashing_the_secret() -> None:
    now = time.time()
    ticket = CookieCodec([SECRET]).encode("sid-1", issued_at=now, expires_at=now + 60)
    kid = jwt.get_unverified_header(ticket)["kid"]
    assert kid != hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    assert kid not in hashlib.sha256(SECRET.encode()).hexdigest()
    with pytest.raises(jwt.InvalidSignatureError):  # the raw secret is not the signing key either
        jwt.decode(ticket, SECRET, algorithms=["HS256"])


def test_a_cookie_issued_before_derived_keys_still_verifies() -> None:
    now = int(time.time())
    legacy = jwt.encode({"sid": "old-sid", "iat": now, "exp": now + 60}, SECRET, algorithm="HS256",
                        headers={"kid": hashlib.sha256(SECRET.encode()).hexdigest()[:12]})
    assert CookieCodec([SECRET]).decode(legacy) == ("old-sid", float(now + 60))
    assert CookieCodec(["Zq71-aPx0MwY8rB3nUcV5tKe2HjL9sDf4Gi6oQ"]).decode(legacy) is None


# -- weak secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weak", ["x" * 40, "ab" * 20, "abcd" * 8, "0" * 16 + "1" * 16])
def test_a_placeholder_secret_is_refused_with_its_path(weak: str) -> None:
    errors = _errors({"secrets": [SECRET, weak]})
    assert list(errors) == ["session.secrets[1]"]
    assert "predictable" in errors["session.secrets[1]"] and weak not in errors["session.secrets[1]"]


@pytest.mark.parametrize("generated", [
    "0f3a9c1e7b2d4f6a8c0e2b4d6f8a1c3e",  # 32 hex characters: 128 random bits
    "Kd83-vQz1LmX0pR7sTfW2yHc9BnE4aGj",  # 32 characters of token_urlsafe(24)
    SECRET,
])
def test_a_generated_secret_passes(generated: str) -> None:
    assert build_config({"session": {"secrets": [generated]}}).session.secrets[0].get_secret_value() == generated


# -- cookie prefixes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["__Host-gw_session", "__Secure-gw_session", "__host-gw"])
def test_a_prefixed_cookie_needs_secure(name: str) -> None:
    errors = _errors({"secrets": [SECRET], "cookie_name": name, "secure": False})
    assert list(errors) == ["session"] and "secure: true" in errors["session"]
    config = build_config({"session": {"secrets": [SECRET], "cookie_name": name, "secure": True}})
    assert config.session.cookie_name == name


def test_the_binding_cookie_gets_a_legal_name() -> None:
    def binding(name: str) -> str:
        return build_config({"session": {"secrets": [SECRET], "cookie_name": name}}).session.binding_cookie_name

    assert binding("gw_session") == "gw_session_login"  # the contract name is unchanged
    # __Host- requires Path=/; the binding cookie has Path=<path_prefix>: __Secure- instead.
    assert binding("__Host-gw_session") == "__Secure-gw_session_login"
    assert binding("__Secure-gw_session") == "__Secure-gw_session_login"


async def test_a_host_prefixed_sign_in_sets_cookies_a_browser_accepts(start_gateway: GatewayStarter) -> None:
    async with start_gateway(session={"cookie_name": "__Host-gw_session", "secure": True}) as running, \
            running.client() as client:
        login = await client.get("/_gateway/login?next=/x", headers={"accept": "text/html"})
    cookies = [value for name, value in login.headers.multi_items() if name == "set-cookie"]
    (binding,) = [c for c in cookies if "_login=" in c]
    assert binding.startswith("__Secure-gw_session_login=")
    attributes = [part.strip().lower() for part in binding.split(";")[1:]]
    assert "secure" in attributes and not any(a.startswith("domain=") for a in attributes)
    assert "path=/_gateway" in attributes
