"""Verifying ``X-Auth-Identity`` in a Python upstream: the gateway's JWKS, cached, and a dependency.

The gateway sends every authenticated request upstream with ``X-Auth-Identity``, an Ed25519 JWT
signed with a key its ``<prefix>/jwks.json`` publishes. An app that trusts the network path to the
gateway can read the plain ``X-Auth-*`` headers; an app that does not (another proxy in between, a
port reachable by others) verifies the JWT instead::

    from gateway.verify import IdentityVerifier, RequireIdentity

    verifier = IdentityVerifier("https://app.example.com/_gateway/jwks.json",
                                issuer="https://app.example.com")
    require_identity = RequireIdentity(verifier)

    # Starlette
    async def hello(request):
        identity = await require_identity(request)
        return PlainTextResponse(f"hello {identity.name}")

    # FastAPI (the same callable, as a dependency)
    @app.get("/hello")
    async def hello(identity: Identity = Depends(require_identity)): ...

What is checked, in order: the token is a JWS with ``alg`` EdDSA and a ``kid`` (nothing else is
accepted, so neither ``none`` nor an HMAC made with the public key can pass); the ``kid`` names a
key of the JWKS; the signature; ``iss`` equals the gateway's ``public_url`` (no trailing slash);
``aud`` contains the expected audience (``identity.jwt_audience``, ``upstream`` by default);
``exp``/``iat`` are present and ``exp`` is not past (``leeway_s`` of clock skew allowed).

Keys are cached ``cache_ttl_s`` (the JWKS's own ``max-age``, 300 s). A token whose ``kid`` the
cache does not know makes one refetch (a key rotated in since), but at most one every
``refetch_interval_s``: a flood of made-up ``kid`` values cannot turn into a flood of JWKS
requests. When the JWKS cannot be fetched, the keys already known keep working (a gateway restart
does not log every user out of the app); with no key known at all, ``JWKSUnavailable``.

``jti`` names one issuance, not one request: the gateway reuses a token for half its lifetime, so
a repeated ``jti`` is no replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from gateway.identity import Identity

#: Where the in-process gateway (``AuthGateway`` wrapping the app) leaves the identity it
#: authenticated: set by the gateway only, never from anything the client sent.
SCOPE_KEY = "gateway.identity"

__all__ = [
    "SCOPE_KEY",
    "IdentityExpired",
    "IdentityInvalid",
    "IdentityMissing",
    "IdentityVerifier",
    "JWKSUnavailable",
    "RequireIdentity",
    "VerificationError",
    "verification_error_handler",
]


class VerificationError(HTTPException):
    """Why a request's identity was not accepted: a stable ``code``, a sentence for a person, and
    the HTTP status to answer with. A Starlette ``HTTPException``, so an app that registers no
    handler still answers 401/503 (Starlette's plain text, FastAPI's ``{"detail": ...}``), never
    500; ``verification_error_handler`` answers ``{"error": code, "message": ...}`` instead."""

    code = "identity_invalid"
    status = 401

    def __init__(self, message: str) -> None:
        headers = {"www-authenticate": 'Bearer error="invalid_token"'} if self.status == 401 else None
        super().__init__(self.status, message, headers=headers)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class IdentityMissing(VerificationError):
    """The request carries no identity: it did not come through the gateway."""

    code = "identity_missing"


class IdentityInvalid(VerificationError):
    """The token is malformed, signed by a key the JWKS does not list, or its claims are wrong."""

    code = "identity_invalid"


class IdentityExpired(IdentityInvalid):
    """A valid token past its ``exp`` (the gateway sends a fresh one on every request: a replay or a
    clock far off)."""

    code = "identity_expired"


class JWKSUnavailable(VerificationError):
    """No key is known and the JWKS cannot be fetched: the gateway is unreachable from the app."""

    code = "jwks_unavailable"
    status = 503


async def verification_error_handler(request: HTTPConnection, exc: Exception) -> Response:
    """``app.add_exception_handler(VerificationError, verification_error_handler)``: the error as
    JSON with its stable code, as the gateway's own errors are."""
    assert isinstance(exc, VerificationError)
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status_code,
                        headers=exc.headers)


class IdentityVerifier:
    """Verifies the gateway's identity JWTs with the keys of its JWKS (fetched and cached here).

    One instance per app (it holds the key cache and an HTTP client); ``aclose`` when done if it
    created the client. ``clock`` (``time.monotonic`` by default) times the key cache: tests move
    it instead of sleeping.
    """

    def __init__(
        self,
        jwks_url: str,
        *,
        issuer: str,
        audience: str = "upstream",
        leeway_s: float = 5.0,
        cache_ttl_s: float = 300.0,
        refetch_interval_s: float = 10.0,
        timeout_s: float = 5.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http(s) URL, e.g. https://app.example.com/_gateway/jwks.json")
        self.jwks_url = jwks_url
        self.issuer = issuer.rstrip("/")  # the gateway's iss never ends with "/"
        self.audience = audience
        self.leeway_s = leeway_s
        self.cache_ttl_s = cache_ttl_s
        self.refetch_interval_s = refetch_interval_s
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # the last fetch attempt, successful or not
        self._fresh_until = float("-inf")
        self._lock = asyncio.Lock()
        #: How many times the JWKS was requested (for a health page or a test).
        self.fetches = 0

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def verify(self, token: str) -> Identity:
        """The identity in ``token``, or a ``VerificationError`` subclass saying why not."""
        claims = await self.claims(token)
        return Identity(provider=claims["provider"], user=claims["user"], tenant=claims.get("tenant") or "",
                        name=claims.get("name") or "")

    async def claims(self, token: str) -> dict[str, Any]:
        """All the verified claims (``sub``, ``jti``, ``iat``, ...), checked as ``verify`` does."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityInvalid("The identity token is not a JWT.") from None
        kid = header.get("kid")
        if header.get("alg") != "EdDSA" or not isinstance(kid, str):
            raise IdentityInvalid("The identity token is not signed the way the gateway signs (EdDSA with a kid).")
        key = await self._key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=["EdDSA"], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise IdentityExpired("The identity token has expired.") from None
        except jwt.PyJWTError as exc:
            raise IdentityInvalid(f"The identity token was refused: {_reason(exc)}.") from None
        if not isinstance(claims.get("provider"), str) or not isinstance(claims.get("user"), str):
            raise IdentityInvalid("The identity token names no provider and user.")
        return claims

    async def _key(self, kid: str) -> jwt.PyJWK:
        if self._clock() >= self._fresh_until or (kid not in self._keys and self._may_refetch()):
            async with self._lock:  # one fetch at a time; the others use its result
                if self._clock() >= self._fresh_until or (kid not in self._keys and self._may_refetch()):
                    await self._fetch()
        key = self._keys.get(kid)
        if key is None:
            if not self._keys:
                raise JWKSUnavailable("The gateway's keys cannot be fetched, so no identity can be verified.")
            raise IdentityInvalid("The identity token is signed with a key the gateway does not publish.")
        return key

    def _may_refetch(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.refetch_interval_s

    async def _fetch(self) -> None:
        self._fetched_at = self._clock()
        self.fetches += 1
        try:
            answer = await self._http.get(self.jwks_url, headers={"accept": "application/json"})
            answer.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(answer.json()).keys
        except (httpx.HTTPError, ValueError, jwt.PyJWTError):
            # Keep the keys already known (and retry after refetch_interval_s, not on every request).
            self._fresh_until = self._clock() + self.refetch_interval_s
            return
        self._keys = {key.key_id: key for key in keys if key.key_id and key.algorithm_name == "EdDSA"}
        self._fresh_until = self._clock() + self.cache_ttl_s


def _reason(exc: jwt.PyJWTError) -> str:
    """PyJWT's reason as a short phrase (it never holds the token)."""
    return {
        jwt.InvalidAudienceError: "it is meant for another audience",
        jwt.InvalidIssuerError: "it comes from another issuer",
        jwt.InvalidSignatureError: "its signature does not match",
        jwt.MissingRequiredClaimError: "a required claim is missing",
        jwt.ImmatureSignatureError: "it was issued in the future (are the clocks set?)",
    }.get(type(exc), "it is malformed")


class RequireIdentity:
    """A dependency that gives an endpoint the verified ``Identity`` of its request.

    A plain callable taking a Starlette ``Request`` (or ``WebSocket``): ``await
    require_identity(request)`` in Starlette, ``Depends(require_identity)`` in FastAPI.

    When the app runs inside the gateway's own middleware (``AuthGateway(app, config)``), the
    gateway already authenticated the request and left the ``Identity`` at
    ``scope["gateway.identity"]``: it is returned as is, no header parsed, no key fetched. Behind
    ``gateway serve`` or forward-auth the request's ``X-Auth-Identity`` (or ``header``) is
    verified with ``verifier``.
    """

    def __init__(self, verifier: IdentityVerifier | None, *, header: str = "X-Auth-Identity") -> None:
        self.verifier = verifier
        self.header = header

    async def __call__(self, request: HTTPConnection) -> Identity:
        in_process = request.scope.get(SCOPE_KEY)
        if isinstance(in_process, Identity):
            return in_process
        values = request.headers.getlist(self.header)
        if not values:
            raise IdentityMissing(f"The request carries no {self.header}: it did not come through the gateway.")
        if len(values) > 1:
            raise IdentityInvalid(f"The request carries {self.header} more than once.")
        if self.verifier is None:
            raise IdentityMissing("The request was not authenticated by the gateway's middleware.")
        return await self.verifier.verify(values[0])
