"""Rotating the identity key across two replicas, with verifiers that cache the JWKS.

Two gateways (replicas A and B) on real sockets, each in front of the echo app, are rolled
through the documented rotation one replica at a time (a rollout restarts one replica, then the
other, on the same address). At every step a user signs in through each replica with the Lark
emulator, and the ``X-Auth-Identity`` each replica sent upstream must verify with PyJWT's
``PyJWKClient`` in its default caching set-up (the JWK Set kept 300 s, an unknown ``kid`` refetched
at most every 30 s): one verifier reads A's JWKS, the other B's, and both keep their cache for the
whole rotation, as an upstream would.

The verifiers' clock is a test clock (PyJWT's cache reads ``time.monotonic``): the documented wait
between the two rollouts (the JWKS ``max-age``, 300 s) is a ``clock.advance``, not a sleep. A
control follows the rotation but skips its first rollout: the caching verifier must reject a
token then, which is what the first rollout is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import jwt.api_jwk
import jwt.jwk_set_cache
import jwt.jwks_client
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.types import Receive, Scope, Send

from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from tests.conftest import BROWSER_UA, Clock, ServedLark, browser_login, echo_app, free_port, headers_of

JWKS_MAX_AGE_S = 300  # the JWKS endpoint's Cache-Control max-age, and PyJWKClient's default lifespan
RESTART_GAP_S = 5  # between one replica's restart and the next one's, within a rollout


class Swappable:
    """One replica's address: the gateway behind it is replaced at each restart (the address stays,
    as a Kubernetes Service or a load balancer's backend does)."""

    def __init__(self) -> None:
        self.app: AuthGateway | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None
        await self.app(scope, receive, send)

    async def restart(self, config: GatewayConfig) -> None:
        old, self.app = self.app, AuthGateway(echo_app(), config)
        if old is not None:
            await old.aclose()


@dataclass
class Replica:
    name: str
    url: str
    slot: Swappable

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/_gateway/jwks.json"


# A replica's settings at one moment: its session secrets and its identity section.
Settings = tuple[list[str], dict[str, Any]]


@pytest.fixture
def verifier_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """PyJWT's JWKS cache and refetch cooldown read this clock instead of ``time.monotonic``."""
    clock = Clock(now=10_000.0)
    fake_time = types.SimpleNamespace(monotonic=clock)
    for module in (jwt.jwks_client, jwt.jwk_set_cache, jwt.api_jwk):
        monkeypatch.setattr(module, "time", fake_time)
    return clock


@contextlib.asynccontextmanager
async def two_replicas(lark: ServedLark) -> AsyncIterator[tuple[Replica, Replica]]:
    slots = {"A": Swappable(), "B": Swappable()}
    ports = {"A": free_port(), "B": free_port()}
    async with contextlib.AsyncExitStack() as stack:
        replicas = []
        for name, slot in slots.items():
            urls = await stack.enter_async_context(serve_apps({name: slot}, port=ports[name]))
            replicas.append(Replica(name, urls[name], slot))
        try:
            yield replicas[0], replicas[1]
        finally:
            for slot in slots.values():
                if slot.app is not None:
                    await slot.app.aclose()


def config_for(replica: Replica, lark: ServedLark, settings: Settings) -> GatewayConfig:
    session_secrets, identity = settings
    return GatewayConfig(
        public_url=replica.url,
        session={"secrets": session_secrets, "secure": False},
        identity=identity,
        providers={"lark": lark.settings()},
    )


async def identity_token(replica: Replica) -> str:
    """Sign a user in through ``replica`` (the browser flow) and return the JWT the app received."""
    async with httpx.AsyncClient(base_url=replica.url, headers={"user-agent": BROWSER_UA}, timeout=30) as client:
        answer = await browser_login(client, "/whoami")
        assert answer.status_code == 200, answer.text
        [token] = headers_of(answer)["x-auth-identity"]
        return token


def verify(verifier: jwt.PyJWKClient, token: str, issuer: str) -> dict[str, Any]:
    """What an upstream does: the key by ``kid`` from the (cached) JWKS, then every check."""
    key = verifier.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="upstream", issuer=issuer,
                                        options={"require": ["exp", "iat", "iss", "aud", "sub"]})
    return claims


async def check_step(label: str, replicas: tuple[Replica, ...], verifiers: dict[str, jwt.PyJWKClient]) -> None:
    """Tokens from every replica verify with every replica's cached verifier."""
    for replica in replicas:
        token = await identity_token(replica)
        for reader, verifier in verifiers.items():
            try:
                claims = await asyncio.to_thread(verify, verifier, token, replica.url)
            except jwt.PyJWTError as exc:
                raise AssertionError(f"{label}: a token from {replica.name} rejected by the verifier of "
                                     f"{reader}'s JWKS: {exc}") from exc
            assert claims["provider"] == "lark" and claims["sub"].startswith("lark:"), (label, claims)


Step = tuple[str, float, Settings, Settings]  # label, clock advance before it, A's settings, B's


async def run_rotation(lark: ServedLark, clock: Clock, steps: list[Step]) -> None:
    async with two_replicas(lark) as (a, b):
        verifiers = {"A": jwt.PyJWKClient(a.jwks_url), "B": jwt.PyJWKClient(b.jwks_url)}
        current: dict[str, Settings | None] = {"A": None, "B": None}
        for label, advance, settings_a, settings_b in steps:
            clock.advance(advance)
            for replica, settings in ((a, settings_a), (b, settings_b)):
                if current[replica.name] != settings:  # a rollout restarts only what changed
                    await replica.slot.restart(config_for(replica, lark, settings))
                    current[replica.name] = settings
            await check_step(label, (a, b), verifiers)


def secret_rotation(old: str, new: str) -> list[Step]:
    """docs/deployment.md, "Rotating session.secrets with several replicas"."""
    plain: dict[str, Any] = {}
    return [
        ("before", 0, ([old], plain), ([old], plain)),
        ("1st rollout, A done", RESTART_GAP_S, ([old, new], plain), ([old], plain)),
        ("1st rollout, B done", RESTART_GAP_S, ([old, new], plain), ([old, new], plain)),
        ("2nd rollout, A done", JWKS_MAX_AGE_S + 1, ([new, old], plain), ([old, new], plain)),
        ("2nd rollout, B done", RESTART_GAP_S, ([new, old], plain), ([new, old], plain)),
        ("old removed, A done", JWKS_MAX_AGE_S + 1, ([new], plain), ([new, old], plain)),
        ("old removed, B done", RESTART_GAP_S, ([new], plain), ([new], plain)),
    ]


async def test_secret_rotation_keeps_every_token_verifiable(lark: ServedLark, verifier_clock: Clock) -> None:
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await run_rotation(lark, verifier_clock, secret_rotation(old, new))


async def test_skipping_the_first_rollout_breaks_a_caching_verifier(
    lark: ServedLark, verifier_clock: Clock
) -> None:
    """The control: the new secret put in front on A while B never listed it. B's JWKS (what B's
    verifier caches) has no key for A's tokens, so this must fail: the first rollout is needed."""
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    steps: list[Step] = [
        ("before", 0, ([old], {}), ([old], {})),
        ("new secret in front on A at once", JWKS_MAX_AGE_S + 1, ([new, old], {}), ([old], {})),
    ]
    with pytest.raises(AssertionError, match="a token from A rejected by the verifier of B's JWKS"):
        await run_rotation(lark, verifier_clock, steps)


def write_key(path: Path) -> Path:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def public_half(private: Path, path: Path) -> Path:
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


async def test_key_file_rotation_keeps_every_token_verifiable(
    lark: ServedLark, verifier_clock: Clock, tmp_path: Path
) -> None:
    """docs/upstream.md, "Rotating the identity key": publish the next key first (its public half is
    enough), then sign with it and publish the previous one, then drop the previous one."""
    old, new = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    new_public = public_half(new, tmp_path / "new.pub.pem")
    secret = [secrets.token_urlsafe(32)]

    def identity(signing: Path, *published: Path) -> Settings:
        return secret, {"signing_key_file": signing, "published_key_files": list(published)}

    make = identity
    await run_rotation(lark, verifier_clock, [
        ("before", 0, make(old), make(old)),
        ("1st rollout, A done", RESTART_GAP_S, make(old, new_public), make(old)),
        ("1st rollout, B done", RESTART_GAP_S, make(old, new_public), make(old, new_public)),
        ("2nd rollout, A done", JWKS_MAX_AGE_S + 1, make(new, old), make(old, new_public)),
        ("2nd rollout, B done", RESTART_GAP_S, make(new, old), make(new, old)),
        ("old removed, A done", JWKS_MAX_AGE_S + 1, make(new), make(new, old)),
        ("old removed, B done", RESTART_GAP_S, make(new), make(new)),
    ])


async def test_the_jwks_lists_the_signing_key_first_then_every_other_secret_key(lark: ServedLark) -> None:
    old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    async with two_replicas(lark) as (a, b):
        await a.slot.restart(config_for(a, lark, ([new, old], {})))
        await b.slot.restart(config_for(b, lark, ([old, new], {})))
        async with httpx.AsyncClient(timeout=10) as client:
            jwks_a = (await client.get(a.jwks_url)).json()["keys"]
            jwks_b = (await client.get(b.jwks_url)).json()["keys"]
        kid_a = jwt.get_unverified_header(await identity_token(a))["kid"]
        kid_b = jwt.get_unverified_header(await identity_token(b))["kid"]
    assert kid_a != kid_b
    assert [key["kid"] for key in jwks_a] == [kid_a, kid_b]
    assert [key["kid"] for key in jwks_b] == [kid_b, kid_a]
    assert all(set(key) == {"kty", "crv", "x", "kid", "use", "alg"} for key in jwks_a + jwks_b)
