"""The identity the upstream receives: headers, and a signed JWT it can verify with the JWKS.

Two rules make the identity unforgeable:

- every header that claims identity is removed from the client's request first, in every spelling
  an upstream could fold together (any case, ``-`` or ``_`` anywhere, every duplicate: see
  ``gateway.edge``);
- the gateway then adds its own: plain headers for convenience, and ``X-Auth-Identity``, an
  Ed25519-signed JWT (``kid``, iss/aud/sub/user/provider/tenant/name/iat/exp/jti) for upstreams
  that verify. The key comes from ``identity.signing_key_file`` (created there on first use) or is
  derived from the first session secret, so replicas that share secrets share the key.

The JWKS lists every key a replica of the fleet may sign with, not only its own: each session
secret's derived key (or the key file's), then ``identity.published_key_files``. So during the
documented two-step rotation (add the new secret at the end everywhere, then move it to the front),
a replica already signing with the new key and one still signing with the old both publish both
keys, and a verifier that caches the JWKS (300 s) from either accepts tokens from both.

Claims upstreams rely on: ``iss`` is ``public_url`` without a trailing slash; ``aud`` is
``identity.jwt_audience``; ``jti`` identifies one issuance, not one request: a token is reused on
the user's requests until half its ``jwt_ttl_s`` has passed (``gateway.auth``), so never treat a
repeated ``jti`` as a replay.

``X-Auth-User`` and the ``user`` claim are unique only within one provider and tenant (a DingTalk
userid is chosen by each organisation's admin); ``sub`` is globally unique: see ``subject``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.config import GatewayConfig, IdentityHeaders
from gateway.edge import fold
from gateway.errors import ConfigError
from gateway.sealing import derive_key

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Identity:
    provider: str
    user: str
    tenant: str
    name: str

    def as_json(self) -> dict[str, str]:
        return {"provider": self.provider, "user": self.user, "tenant": self.tenant, "name": self.name}


def spoofable_names(headers: IdentityHeaders) -> frozenset[bytes]:
    """The configured identity header names, folded (``gateway.edge.fold``: lower case, no ``-``
    or ``_``), so that every spelling an upstream could read as one of them is caught."""
    return frozenset(fold(name.encode("latin-1")) for name in headers.model_dump().values())


def strip_headers(raw: Iterable[tuple[bytes, bytes]], names: frozenset[bytes]) -> Headers:
    """The headers without any whose folded name is in ``names`` (``spoofable_names``)."""
    return [(key, value) for key, value in raw if fold(key) not in names]


def encode_name(name: str) -> str:
    """A display name as a header value: UTF-8, percent-encoded, so no byte can break the header."""
    return quote(name, safe="")


def _header_value(value: str) -> bytes:
    """Ids are printable ASCII in practice; anything else is percent-encoded, never sent raw."""
    if value.isascii() and value.isprintable():
        return value.encode("ascii")
    return quote(value, safe="").encode("ascii")


def identity_headers(
    identity: Identity, names: IdentityHeaders, *, token: str, access_token: str | None = None
) -> Headers:
    """The headers the gateway adds upstream. ``tenant`` is absent (not empty) when unknown."""
    result: Headers = [
        (names.user.lower().encode(), _header_value(identity.user)),
        (names.provider.lower().encode(), _header_value(identity.provider)),
    ]
    if identity.tenant:
        result.append((names.tenant.lower().encode(), _header_value(identity.tenant)))
    if identity.name:
        result.append((names.name.lower().encode(), encode_name(identity.name).encode()))
    result.append((names.jwt.lower().encode(), token.encode()))
    if access_token is not None:
        result.append((names.access_token.lower().encode(), _header_value(access_token)))
    return result


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def derive_signing_key(secret: str) -> Ed25519PrivateKey:
    """An Ed25519 key derived (HKDF-SHA256) from a session secret: same secret, same key."""
    return Ed25519PrivateKey.from_private_bytes(derive_key(secret, b"gateway identity jwt v1"))


def _read_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path`` (``identity.signing_key_file``); when there is no such file, a new
    random key written there first.

    So an operator who sets ``identity.signing_key_file`` gets a key that owes nothing to the
    session secrets (whoever reads a replica's config cannot mint identities with it). The file is
    created 0600 and published atomically (written aside, then hard-linked into place, which fails
    if the name exists): a replica starting at the same moment never reads half a key, and an
    existing key is never overwritten; whichever replica links first wins and the other loads its
    key. Replicas must share the file (a shared volume or a secret store): each one that creates
    its own signs with a key the others' JWKS does not list.
    """
    if path.exists():
        return _read_signing_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    aside = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"identity.signing_key_file: cannot create a key in {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(aside, path)
        except FileExistsError:  # another replica created it first: its key is the key
            return _read_signing_key(path)
    finally:
        aside.unlink(missing_ok=True)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file holding either the private or the public key (a key
    ``identity.published_key_files`` lists: it is published, never used to sign)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"identity.published_key_files: cannot read {path}: {exc.strerror}") from None
    try:
        key: object = (serialization.load_pem_private_key(data, password=None) if b"PRIVATE KEY" in data
                       else serialization.load_pem_public_key(data))
    except (ValueError, TypeError):
        raise ConfigError(f"identity.published_key_files: {path} is not a PEM key") from None
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raise ConfigError(f"identity.published_key_files: {path} does not hold an Ed25519 key")


def signer_for(config: GatewayConfig) -> IdentitySigner:
    """The configured signer: it signs with ``identity.signing_key_file``'s key, or with the first
    session secret's derived key; its JWKS also lists every other session secret's key (none when
    a key file is set: those keys would let a leaked config mint identities again) and every key in
    ``identity.published_key_files``."""
    identity = config.identity
    secrets_ = [secret.get_secret_value() for secret in config.session.secrets]
    others: list[Ed25519PublicKey] = []
    if identity.signing_key_file:
        key = load_signing_key(identity.signing_key_file)
    else:
        key = derive_signing_key(secrets_[0])
        others.extend(derive_signing_key(secret).public_key() for secret in secrets_[1:])
    others.extend(load_public_key(path) for path in identity.published_key_files)
    return IdentitySigner(key, issuer=config.public_url, audience=identity.jwt_audience,
                          ttl_s=identity.jwt_ttl_s, published=others)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The JWK ``kid`` of a public key: its hash (12 bytes of SHA-256, base64url), so every replica
    that holds the same key names it the same, and the name says nothing about a secret."""
    return _b64url(hashlib.sha256(_raw(key)).digest()[:12])


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(_raw(key)), "kid": key_id(key), "use": "sig",
            "alg": "EdDSA"}


def subject(identity: Identity) -> str:
    """The JWT ``sub``: ``provider:tenant:user``, each part percent-encoded (RFC 3986 unreserved
    characters kept, everything else, ``:`` and ``%`` included, as ``%XX`` of its UTF-8 bytes), so
    splitting on ``:`` and percent-decoding each part gives the triple back, and two identities
    share a ``sub`` only when provider, tenant and user are all equal. An unknown tenant is empty."""
    return ":".join(quote(part, safe="") for part in (identity.provider, identity.tenant, identity.user))


class IdentitySigner:
    """Issues identity JWTs and publishes the JWKS that verifies them: its own key first, then the
    ``published`` ones (keys other replicas may sign with during a rotation), each listed once."""

    def __init__(self, key: Ed25519PrivateKey, *, issuer: str, audience: str, ttl_s: int,
                 published: Sequence[Ed25519PublicKey] = ()) -> None:
        self._key = key
        self.kid = key_id(key.public_key())
        jwks = {self.kid: public_jwk(key.public_key())}
        for other in published:
            jwks.setdefault(key_id(other), public_jwk(other))
        self._jwks = list(jwks.values())
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign(self, identity: Identity, *, now: float | None = None) -> tuple[str, float]:
        """A fresh JWT for ``identity`` and its expiry time."""
        issued = int(now if now is not None else time.time())
        expires = issued + self.ttl_s
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject(identity),
            "user": identity.user,
            "provider": identity.provider,
            "tenant": identity.tenant,
            "name": identity.name,
            "iat": issued,
            "exp": expires,
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, self._key, algorithm="EdDSA", headers={"kid": self.kid}), float(expires)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(jwk) for jwk in self._jwks]}
