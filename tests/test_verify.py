"""gateway.verify: an upstream verifying X-Auth-Identity against a real gateway's JWKS.

The gateway runs on a real socket in front of an app that verifies its requests with
``RequireIdentity`` (Starlette, then FastAPI: a dev extra, so the ``Depends`` use is tested with the
framework itself). A JWKS served by a small app the test controls covers the cache: a ``kid`` not
seen yet refetches once, a flood of unknown ``kid`` values does not turn into a flood of fetches,
a JWKS that goes down keeps the keys known.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import fastapi
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import verify as verify_module
from gateway.identity import Identity, IdentitySigner
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from gateway.verify import (
    SCOPE_KEY,
    IdentityExpired,
    IdentityInvalid,
    IdentityMissing,
    IdentityVerifier,
    JWKSUnavailable,
    RequireIdentity,
    VerificationError,
    verification_error_handler,
)
from tests.conftest import BROWSER_UA, Clock, ConfigFactory, ServedLark, browser_login, free_port

ISSUER = "https://app.example.com"
ALICE = Identity("lark", "ou_alice", "tenant_1", "Alice")


def signer(key: Ed25519PrivateKey | None = None, *, issuer: str = ISSUER, audience: str = "upstream",
           ttl_s: int = 60) -> IdentitySigner:
    return IdentitySigner(key or Ed25519PrivateKey.generate(), issuer=issuer, audience=audience, ttl_s=ttl_s)


class JWKSHost:
    """A JWKS endpoint whose keys (and availability) the test changes; it counts its requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.up = True
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.requests += 1
        response: Response = (JSONResponse({"keys": self.keys}) if self.up
                              else Response("down", status_code=503))
        await response(scope, receive, send)


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[JWKSHost, str]]:
    host = JWKSHost()
    async with serve_apps({"jwks": host}) as urls:
        yield host, f"{urls['jwks']}/jwks.json"


async def test_a_token_of_the_published_key_verifies_into_its_identity(jwks: tuple[JWKSHost, str]) -> None:
    host, url = jwks
    issuing = signer()
    host.keys = issuing.jwks()["keys"]
    verifier = IdentityVerifier(url, issuer=ISSUER + "/")  # a trailing slash is forgiven: iss never has one
    token, _ = issuing.sign(ALICE)
    assert await verifier.verify(token) == ALICE
    claims = await verifier.claims(token)
    assert claims["sub"] == "lark:tenant_1:ou_alice" and claims["iss"] == ISSUER
    await verifier.aclose()


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("case", ["audience", "issuer", "expired", "tampered", "none", "hs256", "no_kid",
                                  "unknown_key", "garbage", "no_user"])
async def test_every_wrong_token_is_refused_with_its_code(jwks: tuple[JWKSHost, str], case: str) -> None:
    host, url = jwks
    issuing = signer()
    host.keys = issuing.jwks()["keys"]
    verifier = IdentityVerifier(url, issuer=ISSUER)
    good, _ = issuing.sign(ALICE)
    header = {"alg": "EdDSA", "kid": issuing.kid, "typ": "JWT"}
    claims = jwt.decode(good, options={"verify_signature": False})
    expected: type[VerificationError] = IdentityInvalid
    if case == "audience":
        token, _ = signer(issuing._key, audience="another-app").sign(ALICE)
    elif case == "issuer":
        token, _ = signer(issuing._key, issuer="https://evil.example.com").sign(ALICE)
    elif case == "expired":
        token, _ = issuing.sign(ALICE, now=time.time() - 120)
        expected = IdentityExpired
    elif case == "tampered":
        head, _, signature = good.split(".")
        token = f"{head}.{_b64({**claims, 'user': 'ou_admin'})}.{signature}"
    elif case == "none":
        token = f"{_b64({'alg': 'none', 'kid': issuing.kid})}.{_b64(claims)}."
    elif case == "hs256":  # the classic confusion: an HMAC keyed with the public key's bytes
        public_x = host.keys[0]["x"]
        token = jwt.encode(claims, public_x, algorithm="HS256", headers={"kid": issuing.kid})
    elif case == "no_kid":
        token = jwt.encode(claims, issuing._key, algorithm="EdDSA")
    elif case == "unknown_key":
        token, _ = signer().sign(ALICE)
    elif case == "garbage":
        token = "not-a-jwt"
    else:
        token = jwt.encode({k: v for k, v in claims.items() if k != "user"}, issuing._key, algorithm="EdDSA",
                           headers=header)
    with pytest.raises(expected) as caught:
        await verifier.verify(token)
    assert caught.value.status_code == 401 and caught.value.code == expected.code
    assert token not in str(caught.value)
    await verifier.aclose()


async def test_a_new_kid_refetches_once_and_a_flood_of_unknown_kids_does_not(jwks: tuple[JWKSHost, str]) -> None:
    host, url = jwks
    clock = Clock(now=1000.0)
    old, new = signer(), signer()
    host.keys = old.jwks()["keys"]
    verifier = IdentityVerifier(url, issuer=ISSUER, clock=clock, refetch_interval_s=10)
    assert (await verifier.verify(old.sign(ALICE)[0])).user == "ou_alice"
    assert host.requests == 1
    clock.advance(11)
    # A rotation: the gateway publishes the new key; its first token triggers one refetch.
    host.keys = new.jwks()["keys"] + old.jwks()["keys"]
    assert (await verifier.verify(new.sign(ALICE)[0])).user == "ou_alice"
    assert (await verifier.verify(old.sign(ALICE)[0])).user == "ou_alice"
    assert host.requests == 2
    # Made-up kids right after: refused, and no further fetch until refetch_interval_s has passed.
    for _ in range(50):
        with pytest.raises(IdentityInvalid, match="key the gateway does not publish"):
            await verifier.verify(signer().sign(ALICE)[0])
    assert host.requests == 2
    clock.advance(11)
    with pytest.raises(IdentityInvalid):
        await verifier.verify(signer().sign(ALICE)[0])
    assert host.requests == 3
    # Known keys are served from the cache until cache_ttl_s (300 s) has passed.
    for _ in range(5):
        await verifier.verify(new.sign(ALICE)[0])
    assert host.requests == 3
    clock.advance(301)
    await verifier.verify(new.sign(ALICE)[0])
    assert host.requests == 4
    await verifier.aclose()


async def test_a_jwks_that_goes_down_keeps_the_known_keys_and_none_known_is_503(
    jwks: tuple[JWKSHost, str],
) -> None:
    host, url = jwks
    clock = Clock(now=1000.0)
    issuing = signer()
    host.keys = issuing.jwks()["keys"]
    host.up = False
    verifier = IdentityVerifier(url, issuer=ISSUER, clock=clock)
    with pytest.raises(JWKSUnavailable) as caught:
        await verifier.verify(issuing.sign(ALICE)[0])
    assert caught.value.status_code == 503
    # Not retried on every request while down: once per refetch_interval_s.
    with pytest.raises(JWKSUnavailable):
        await verifier.verify(issuing.sign(ALICE)[0])
    assert host.requests == 1
    host.up = True
    clock.advance(11)
    assert await verifier.verify(issuing.sign(ALICE)[0]) == ALICE
    host.up = False
    clock.advance(400)  # the cache is stale and the JWKS down: the known key still verifies
    assert await verifier.verify(issuing.sign(ALICE)[0]) == ALICE
    assert host.requests == 3
    await verifier.aclose()


def test_the_verifier_refuses_a_jwks_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match="http"):
        IdentityVerifier("file:///etc/passwd", issuer=ISSUER)


# -- in an app, behind a real gateway -------------------------------------------------------------


def starlette_app(require: RequireIdentity) -> Starlette:
    async def whoami(request: Request) -> Response:
        identity = await require(request)
        return JSONResponse({**identity.as_json(), "in_scope": SCOPE_KEY in request.scope})

    app = Starlette(routes=[Route("/whoami", whoami)])
    app.add_exception_handler(VerificationError, verification_error_handler)
    return app


def fastapi_app(require: RequireIdentity) -> fastapi.FastAPI:
    app = fastapi.FastAPI()

    @app.get("/whoami")
    async def whoami(identity: Identity = fastapi.Depends(require)) -> dict[str, str]:  # noqa: B008
        return identity.as_json()

    return app


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_behind_the_gateway_the_app_gets_the_verified_identity(
    lark: ServedLark, make_config: ConfigFactory, framework: str
) -> None:
    """The app is served on its own port (as behind ``gateway serve``) and verifies each request
    with the gateway's JWKS; a request that bypasses the gateway is refused, forged or not."""
    gateway_port = free_port()
    verifier = IdentityVerifier(f"http://127.0.0.1:{gateway_port}/_gateway/jwks.json",
                                issuer=f"http://127.0.0.1:{gateway_port}")
    require = RequireIdentity(verifier)
    app = starlette_app(require) if framework == "starlette" else fastapi_app(require)
    async with serve_apps({"app": app}) as app_urls:
        from gateway.cli import build_sidecar

        config = make_config(public_url=f"http://127.0.0.1:{gateway_port}", upstream={"url": app_urls["app"]})
        gateway: Any = build_sidecar(config)
        try:
            async with serve_apps({"gateway": gateway}, port=gateway_port) as urls, httpx.AsyncClient(
                base_url=urls["gateway"], headers={"user-agent": BROWSER_UA}, timeout=30
            ) as client:
                answer = await browser_login(client, "/whoami")
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert body["provider"] == "lark" and body["user"] and body["name"]
                # Straight to the app: no identity, a forged one, one from another key.
                async with httpx.AsyncClient(base_url=app_urls["app"], timeout=10) as direct:
                    missing = await direct.get("/whoami")
                    forged_claims = {"iss": f"http://127.0.0.1:{gateway_port}", "aud": "upstream",
                                     "sub": "lark::ou_admin", "user": "ou_admin", "provider": "lark",
                                     "iat": int(time.time()), "exp": int(time.time()) + 60}
                    forged = jwt.encode(forged_claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                                        headers={"kid": "made-up"})
                    refused = await direct.get("/whoami", headers={"x-auth-identity": forged})
                    twice = await direct.get("/whoami", headers=[("x-auth-identity", forged)] * 2)
        finally:
            await gateway.aclose()
            await verifier.aclose()
    assert missing.status_code == refused.status_code == twice.status_code == 401
    if framework == "starlette":
        assert missing.json()["error"] == "identity_missing"
        assert refused.json() == {"error": "identity_invalid",
                                  "message": "The identity token is signed with a key the gateway does not publish."}
    else:  # FastAPI's own HTTPException handler: the sentence as "detail"
        assert "through the gateway" in missing.json()["detail"]
        assert "does not publish" in refused.json()["detail"]
    assert missing.headers["www-authenticate"].startswith("Bearer")


async def test_in_middleware_mode_the_identity_is_on_the_scope(lark: ServedLark, make_config: ConfigFactory) -> None:
    """``AuthGateway(app, config)`` in-process: the dependency takes the identity from the scope
    (no verifier at all, so nothing is fetched), and the scope's identity is the headers' one."""
    require = RequireIdentity(None)
    seen: list[Any] = []

    async def whoami(request: Request) -> Response:
        identity = await require(request)
        seen.append(request.scope[SCOPE_KEY])
        return JSONResponse({**identity.as_json(), "header_user": request.headers.get("x-auth-user")})

    app = Starlette(routes=[Route("/whoami", whoami), Route("/public/whoami", whoami)])
    app.add_exception_handler(VerificationError, verification_error_handler)
    port = free_port()
    gateway = AuthGateway(app, make_config(public_url=f"http://127.0.0.1:{port}",
                                           access={"public_paths": ["/public/*"]}))
    try:
        async with serve_apps({"gateway": gateway}, port=port) as urls, httpx.AsyncClient(
            base_url=urls["gateway"], headers={"user-agent": BROWSER_UA}, timeout=30
        ) as client:
            answer = await browser_login(client, "/whoami")
            assert answer.status_code == 200, answer.text
            # A public path reaches the app unauthenticated: nothing on the scope there.
            public = await client.get("/public/whoami")
    finally:
        await gateway.aclose()
    body = answer.json()
    assert body["provider"] == "lark" and body["user"] == body["header_user"]
    assert isinstance(seen[0], Identity) and seen[0].user == body["user"]
    assert public.status_code == 401 and public.json()["error"] == "identity_missing"
    assert len(seen) == 1


async def test_a_scope_value_that_is_not_an_identity_is_not_believed() -> None:
    """Only the gateway's own ``Identity`` object counts; anything else in the scope is ignored
    and the request's header is verified (here: there is none)."""
    require = RequireIdentity(None)
    scope = {"type": "http", "headers": [], SCOPE_KEY: {"provider": "lark", "user": "ou_admin"}}
    with pytest.raises(IdentityMissing):
        await require(Request(scope))


def test_the_module_is_re_exported_by_the_package() -> None:
    import gateway

    assert gateway.verify is verify_module
    assert gateway.IdentityVerifier is IdentityVerifier and gateway.RequireIdentity is RequireIdentity
