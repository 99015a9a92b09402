"""gateway.identity: stripping forged identity headers, adding the real ones, the signed JWT."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import unquote

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig, IdentityHeaders
from gateway.edge import fold
from gateway.errors import ConfigError
from gateway.identity import (
    Identity,
    IdentitySigner,
    derive_signing_key,
    encode_name,
    identity_headers,
    load_public_key,
    load_signing_key,
    signer_for,
    spoofable_names,
    strip_headers,
)

DEFAULT = IdentityHeaders()
DEFAULT_NAMES = [
    "X-Auth-User",
    "X-Auth-Provider",
    "X-Auth-Tenant",
    "X-Auth-Name",
    "X-Auth-Identity",
    "X-Auth-Access-Token",
]
UNRELATED = [
    (b"host", b"app.example.com"),
    (b"accept", b"text/html"),
    (b"x-auth", b"1"),
    (b"x-auth-users", b"2"),
    (b"x-auth-user-agent", b"3"),
    (b"authorization", b"Bearer abc"),
    (b"x-forwarded-user", b"4"),
    (b"user", b"5"),
    (b"cookie", b"a=b"),
    (b"accept", b"application/json"),  # a duplicate unrelated header survives too
]


def _recase(name: str, flips: list[bool]) -> bytes:
    return "".join(c.upper() if flip else c.lower() for c, flip in zip(name, flips, strict=True)).encode()


# -- stripping ---------------------------------------------------------------------------------


def test_spoofable_names_are_the_configured_names_folded() -> None:
    expected = {name.lower().replace("-", "").encode() for name in DEFAULT_NAMES}
    assert spoofable_names(DEFAULT) == expected


def test_strip_removes_every_variant_and_keeps_the_rest_in_order() -> None:
    forged = [
        (b"x-auth-user", b"admin"),
        (b"X-AUTH-USER", b"admin"),
        (b"x_auth_user", b"admin"),
        (b"X_Auth_User", b"admin"),
        (b"x-auth-user", b"admin2"),
        (b"x-auth-identity", b"eyJ..."),
        (b"x-auth-access-token", b"t"),
        (b"X_AUTH_ACCESS_TOKEN", b"t"),
        (b"x-Auth-Tenant", b"corp"),
        (b"x-auth-name", b"%E5%BC%A0"),
        (b"x-auth-provider", b"lark"),
        # mixed spellings that WSGI/CGI/PHP fold onto the same variable (issue 10, finding 1)
        (b"X-Auth_User", b"admin"), (b"x_auth-tenant", b"corp"), (b"x-auth-user_", b"admin"),
        (b"x__auth--user", b"admin"), (b"xauthuser", b"admin"), (b"_x-auth-identity", b"forged"),
    ]
    mixed = []
    for index, header in enumerate(UNRELATED):
        mixed.append(header)
        mixed.append(forged[index % len(forged)])
    mixed.extend(forged)
    assert strip_headers(mixed, spoofable_names(DEFAULT)) == UNRELATED


@settings(max_examples=60)
@given(st.data())
def test_strip_property_random_casing(data: st.DataObject) -> None:
    forged = []
    for name in DEFAULT_NAMES:
        for spelling in (name, name.replace("-", "_")):
            for _ in range(data.draw(st.integers(0, 3))):
                flips = data.draw(st.lists(st.booleans(), min_size=len(spelling), max_size=len(spelling)))
                forged.append((_recase(spelling, flips), b"forged"))
    order = data.draw(st.permutations(range(len(UNRELATED) + len(forged))))
    pool = [("keep", h) for h in UNRELATED] + [("drop", h) for h in forged]
    mixed = [pool[i] for i in order]
    result = strip_headers([header for _, header in mixed], spoofable_names(DEFAULT))
    assert result == [header for kind, header in mixed if kind == "keep"]


_header_name = st.text(alphabet="abcxyzXYZ019-", min_size=1, max_size=16)


@settings(max_examples=60)
@given(st.lists(_header_name, min_size=6, max_size=6, unique_by=lambda n: n.lower().replace("-", "")),
       st.data())
def test_strip_property_custom_names(custom: list[str], data: st.DataObject) -> None:
    fields = ["user", "provider", "tenant", "name", "jwt", "access_token"]
    configured = IdentityHeaders(**dict(zip(fields, custom, strict=True)))
    names = spoofable_names(configured)
    assert names == {name.lower().replace("-", "").encode() for name in custom}
    keep = [(key, value) for key, value in UNRELATED if key.replace(b"-", b"").lower() not in names]
    forged = []
    for name in custom:
        spelling = data.draw(st.sampled_from([name, name.replace("-", "_"), name + "_", "-" + name]))
        flips = data.draw(st.lists(st.booleans(), min_size=len(spelling), max_size=len(spelling)))
        forged.append((_recase(spelling, flips), b"forged"))
    result = strip_headers(forged + keep + forged, names)
    assert result == keep


@given(st.text(alphabet="abcdehinorstuwx019-_", min_size=1, max_size=30))
def test_strip_never_removes_other_names(name: str) -> None:
    assume(name.replace("-", "").replace("_", "").lower().encode() not in spoofable_names(DEFAULT))
    assert strip_headers([(name.encode(), b"v")], spoofable_names(DEFAULT)) == [(name.encode(), b"v")]


# -- the headers the gateway adds ----------------------------------------------------------------


def _as_dict(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    result = dict(headers)
    assert len(result) == len(headers), "a header appears twice"
    return result


def test_identity_headers_with_every_field() -> None:
    identity = Identity(provider="lark", user="ou_123", tenant="tenant-1", name="Alice")
    headers = _as_dict(identity_headers(identity, DEFAULT, token="jwt-value", access_token="u-token"))
    assert headers == {
        b"x-auth-user": b"ou_123",
        b"x-auth-provider": b"lark",
        b"x-auth-tenant": b"tenant-1",
        b"x-auth-name": b"Alice",
        b"x-auth-identity": b"jwt-value",
        b"x-auth-access-token": b"u-token",
    }


def test_identity_headers_omit_empty_tenant_name_and_token() -> None:
    identity = Identity(provider="wemeet", user="u1", tenant="", name="")
    headers = _as_dict(identity_headers(identity, DEFAULT, token="jwt-value"))
    assert set(headers) == {b"x-auth-user", b"x-auth-provider", b"x-auth-identity"}


def test_identity_headers_use_custom_names() -> None:
    names = IdentityHeaders(
        user="X-Remote-User",
        provider="X-Remote-Idp",
        tenant="X-Org",
        name="X-Display",
        jwt="X-Jwt",
        access_token="X-At",
    )
    identity = Identity(provider="dingtalk", user="u", tenant="corp", name="n")
    headers = _as_dict(identity_headers(identity, names, token="t", access_token="a"))
    assert set(headers) == {b"x-remote-user", b"x-remote-idp", b"x-org", b"x-display", b"x-jwt", b"x-at"}
    # What the gateway adds is exactly what it strips from clients.
    assert {fold(name) for name in headers} <= spoofable_names(names)


@pytest.mark.parametrize(
    "name", ["张三", "李四 (研发部)", "Zoë O'Brien", "evil\r\nX-Auth-User: admin", "a\nb", "100% sure", "a+b c", "\x00"]
)
def test_name_is_percent_encoded_and_round_trips(name: str) -> None:
    identity = Identity(provider="lark", user="u", tenant="", name=name)
    value = _as_dict(identity_headers(identity, DEFAULT, token="t"))[b"x-auth-name"]
    text = value.decode("ascii")  # plain ASCII, whatever the name
    assert all(0x21 <= ord(char) < 0x7F for char in text)
    assert unquote(text, encoding="utf-8", errors="strict") == name
    assert encode_name(name) == text


@given(st.text(min_size=1))
def test_name_encoding_property(name: str) -> None:
    encoded = encode_name(name)
    assert all(char.isascii() and (char.isalnum() or char in "%-._~") for char in encoded)
    assert unquote(encoded, errors="strict") == name


# -- the signed identity JWT -----------------------------------------------------------------------


def _signer(key: Ed25519PrivateKey | None = None, ttl_s: int = 60) -> IdentitySigner:
    return IdentitySigner(
        key or derive_signing_key("s" * 40), issuer="https://app.example.com", audience="upstream", ttl_s=ttl_s
    )


def _verify(token: str, jwks: dict[str, object], **options: object) -> dict[str, object]:
    keys = jwks["keys"]
    assert isinstance(keys, list)
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in keys if k["kid"] == kid]
    return jwt.decode(
        token,
        jwt.PyJWK(jwk),
        algorithms=["EdDSA"],
        audience="upstream",
        issuer="https://app.example.com",
        options={"require": ["iss", "aud", "sub", "iat", "exp", "jti"]},
        **options,
    )


def test_jwt_verifies_with_jwks() -> None:
    signer = _signer()
    identity = Identity(provider="lark", user="ou_1", tenant="t-1", name="张三")
    before = int(time.time())
    token, expires_at = signer.sign(identity)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == signer.kid
    claims = _verify(token, signer.jwks())
    assert claims["iss"] == "https://app.example.com"
    assert claims["aud"] == "upstream"
    assert claims["sub"] == "lark:t-1:ou_1" and claims["user"] == "ou_1"
    assert claims["provider"] == "lark"
    assert claims["tenant"] == "t-1"
    assert claims["name"] == "张三"
    assert before <= claims["iat"] <= time.time()
    assert claims["exp"] == claims["iat"] + 60 == expires_at
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    second, _ = signer.sign(identity)
    assert _verify(second, signer.jwks())["jti"] != claims["jti"]


def test_jwks_publishes_only_the_public_key() -> None:
    signer = _signer()
    (jwk,) = signer.jwks()["keys"]
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA" and jwk["use"] == "sig"
    assert jwk["kid"] == signer.kid
    assert "d" not in jwk
    raw_public = signer.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert jwt.PyJWK(jwk).key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw_public


def test_jwt_rejected_with_other_key_audience_or_expiry() -> None:
    signer = _signer()
    identity = Identity(provider="lark", user="ou_1", tenant="", name="")
    stranger = _signer(derive_signing_key("t" * 40))
    token, _ = stranger.sign(identity)
    (jwk,) = signer.jwks()["keys"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, jwt.PyJWK(jwk), algorithms=["EdDSA"], audience="upstream")
    good, _ = signer.sign(identity)
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(good, jwt.PyJWK(jwk), algorithms=["EdDSA"], audience="another-app")
    old, expires_at = signer.sign(identity, now=time.time() - 3600)
    assert expires_at < time.time()
    with pytest.raises(jwt.ExpiredSignatureError):
        _verify(old, signer.jwks())
    assert _verify(good, signer.jwks())["tenant"] == ""


def test_sign_uses_the_given_clock() -> None:
    signer = _signer(ttl_s=30)
    token, expires_at = signer.sign(Identity("p", "u", "", ""), now=1_000_000.9)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iat"] == 1_000_000 and claims["exp"] == 1_000_030 == expires_at


# -- keys ---------------------------------------------------------------------------------------------


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def test_derived_key_is_deterministic_per_secret() -> None:
    first = derive_signing_key("a" * 40)
    assert _raw_private(first) == _raw_private(derive_signing_key("a" * 40))
    assert _raw_private(first) != _raw_private(derive_signing_key("a" * 39 + "b"))
    assert _raw_private(first) != hashlib.sha256(("a" * 40).encode()).digest()  # not the bare hash
    # Replicas sharing the secret publish the same key id and verify each other's tokens.
    replica_a, replica_b = _signer(derive_signing_key("a" * 40)), _signer(derive_signing_key("a" * 40))
    assert replica_a.kid == replica_b.kid
    token, _ = replica_a.sign(Identity("lark", "u", "", ""))
    assert _verify(token, replica_b.jwks())["user"] == "u"
    assert _signer(derive_signing_key("b" * 40)).kid != replica_a.kid


def test_load_signing_key_from_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "identity.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    loaded = load_signing_key(path)
    assert _raw_private(loaded) == _raw_private(key)
    token, _ = _signer(loaded).sign(Identity("lark", "u", "", ""))
    assert _verify(token, _signer(key).jwks())["user"] == "u"


def test_load_signing_key_refuses_other_key_types(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="Ed25519"):
        load_signing_key(path)


# -- the JWKS: every key a replica may sign with ------------------------------------------------

SECRET_A, SECRET_B = "k7Qp2xVb9LmN4rT6wZ1yH3sD8fG5jK0a", "Zx8Cv7Bn6Mm5Ll4Kk3Jj2Hh1Gg0Ff9Dd"


def _config(secrets_: list[str], **identity: object) -> GatewayConfig:
    return GatewayConfig(public_url="https://app.example.com", session={"secrets": secrets_}, identity=identity)


def test_every_session_secret_key_is_published_and_the_first_signs() -> None:
    signer = signer_for(_config([SECRET_A, SECRET_B]))
    keys = signer.jwks()["keys"]
    assert [key["kid"] for key in keys] == [signer.kid, signer_for(_config([SECRET_B])).kid]
    # The token of a replica still signing with SECRET_B verifies with this replica's JWKS.
    token, _ = signer_for(_config([SECRET_B, SECRET_A])).sign(Identity("lark", "u", "", ""))
    assert _verify(token, {"keys": keys[1:]})["user"] == "u"


def test_a_key_file_hides_the_secret_keys_and_adds_the_published_ones(tmp_path: Path) -> None:
    nxt = Ed25519PrivateKey.generate()
    public = tmp_path / "next.pub.pem"
    public.write_bytes(nxt.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    signer = signer_for(_config([SECRET_A, SECRET_B], signing_key_file=tmp_path / "id.pem",
                                published_key_files=[public, public]))
    kids = [key["kid"] for key in signer.jwks()["keys"]]
    secret_kids = {signer_for(_config([secret])).kid for secret in (SECRET_A, SECRET_B)}
    assert len(kids) == 2 and kids[0] == signer.kid and not secret_kids & set(kids)  # listed once
    assert _raw_public(load_public_key(public)) == _raw_public(nxt.public_key())


def test_without_a_key_file_the_published_keys_follow_the_secret_keys(tmp_path: Path) -> None:
    """Moving from the derived key to a key file: the file's key is published first, beside the
    secrets' keys, before any replica signs with it (docs/upstream.md)."""
    nxt = Ed25519PrivateKey.generate()
    private = tmp_path / "next.pem"
    private.write_bytes(nxt.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    signer = signer_for(_config([SECRET_A, SECRET_B], published_key_files=[private]))
    kids = [key["kid"] for key in signer.jwks()["keys"]]
    assert kids == [signer_for(_config([SECRET_A])).kid, signer_for(_config([SECRET_B])).kid,
                    _signer(nxt).kid]
    # A replica that already signs with the file's key is verified by this replica's JWKS.
    token, _ = signer_for(_config([SECRET_A], signing_key_file=private)).sign(Identity("lark", "u", "", ""))
    assert _verify(token, signer.jwks())["user"] == "u"
    assert private.read_bytes() == nxt.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())  # never rewritten


def _raw_public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    (b"not a key", "is not a PEM key"),
    (ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
     "does not hold an Ed25519 key"),
])
def test_a_published_key_file_that_cannot_be_used_is_a_config_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "published.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"identity.published_key_files: .*{message}"):
        signer_for(_config([SECRET_A], published_key_files=[path]))
