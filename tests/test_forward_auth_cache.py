"""The auth-cache recipe behind a real nginx: ``deploy/nginx/forward-auth-cache.conf``.

Same site as ``test_forward_auth.py`` (nginx in front, the gateway answering ``/_gateway/*``, the
echo app upstream), with the recipe's cache TTL shortened from 5 s to 1 s so the revocation delay
can be watched. What must hold: the gateway is asked once per cookie per TTL; only answers that
carry an identity are cached (a public path's 200 or a 401 never is, so a forged cookie cannot ride
on one); a revoked session passes for at most the TTL, then never again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from tests.conftest import (
    BROWSER_UA,
    HTML,
    ConfigFactory,
    NginxStarter,
    browser_login,
    echo_app,
    free_port,
    headers_of,
)

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "forward-auth-cache.conf"
ZHANG = "ou_7dab8a3d3cdcc9da365777c7ad535d62"
TTL_S = 1  # nginx counts whole seconds: an entry may live up to TTL_S + 1


@dataclass
class Site:
    url: str
    auth_calls: list[str]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": BROWSER_UA}, timeout=10)


class CountAuth:
    """Counts the forward-auth questions that reach the gateway."""

    def __init__(self, app: Any, calls: list[str]) -> None:
        self.app, self.calls = app, calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/_gateway/auth":
            original = dict(scope["headers"]).get(b"x-original-uri", b"").decode()
            self.calls.append(original)
        await self.app(scope, receive, send)


def fill(template: str, **values: object) -> str:
    for name, value in values.items():
        placeholder = "${" + name + "}"
        assert placeholder in template, f"{placeholder} is not in {TEMPLATE}"
        template = template.replace(placeholder, str(value))
    assert "${" not in template
    assert "proxy_cache_valid 200 5s;" in template, "the documented TTL changed: update this test"
    return template.replace("proxy_cache_valid 200 5s;", f"proxy_cache_valid 200 {TTL_S}s;")


@pytest.fixture
async def site(make_config: ConfigFactory, start_nginx: NginxStarter, tmp_path: Path) -> AsyncIterator[Site]:
    async def not_here(request: Request) -> Response:
        return PlainTextResponse("app traffic goes to the upstream, not here", status_code=500)

    listen = free_port()
    config = make_config(public_url=f"http://127.0.0.1:{listen}", access={"public_paths": ["/public/*"],
                                                                                 "trusted_proxies": ["127.0.0.1/32"]})
    gateway = AuthGateway(Starlette(routes=[Route("/{path:path}", not_here)]), config)
    calls: list[str] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls = await stack.enter_async_context(
                serve_apps({"gateway": CountAuth(gateway, calls), "app": echo_app()}))
            conf = fill(TEMPLATE.read_text(), LISTEN_PORT=listen, GATEWAY_PORT=urlsplit(urls["gateway"]).port,
                        APP_PORT=urlsplit(urls["app"]).port, CACHE_DIR=tmp_path / "auth-cache")
            url = await stack.enter_async_context(start_nginx(conf, listen))
            yield Site(url, calls)
    finally:
        await gateway.aclose()


async def test_the_gateway_is_asked_once_per_cookie_and_ttl(site: Site) -> None:
    async with site.client() as client:
        await browser_login(client, "/first")
        site.auth_calls.clear()
        for index in range(5):
            answer = await client.get(f"/page/{index}")
            assert answer.status_code == 200
            assert headers_of(answer)["x-auth-user"] == [ZHANG]
            assert answer.json()["cookies"] == {}  # the ticket still never reaches the app
        assert len(site.auth_calls) <= 1, site.auth_calls
        await asyncio.sleep(TTL_S + 1.2)
        assert (await client.get("/later")).status_code == 200
        assert len(site.auth_calls) <= 2, site.auth_calls  # asked again once the entry expired


async def test_answers_without_an_identity_are_never_cached(site: Site) -> None:
    forged = {"cookie": "gw_session=forged.value.here", "accept": "application/json"}
    async with site.client() as client:
        # A public path answers 200 whatever the cookie: that answer must not open private paths.
        assert (await client.get("/public/page", headers=forged)).status_code == 200
        refused = await client.get("/private", headers=forged)
        assert refused.status_code == 401, refused.text
        assert (await client.get("/private", headers=forged)).status_code == 401  # 401s are not cached either
        # No cookie at all: every request asks the gateway.
        assert (await client.get("/private", headers={"accept": "application/json"})).status_code == 401

        await browser_login(client)
        await asyncio.sleep(TTL_S + 1.2)  # the login's own answer has left the cache
        # A valid cookie on a public path first (200, no identity): the next private request still
        # gets its identity, not a cached "public" answer.
        assert "x-auth-user" not in headers_of(await client.get("/public/other"))
        assert headers_of(await client.get("/private"))["x-auth-user"] == [ZHANG]


async def test_a_revoked_session_passes_for_at_most_the_ttl(site: Site) -> None:
    async with site.client() as client:
        await browser_login(client)
        ticket = client.cookies["gw_session"]
        assert (await client.get("/inbox")).status_code == 200  # cached now
        out = await client.post("/_gateway/logout", headers={"origin": site.url})
        assert out.status_code == 200
    async with site.client() as replay:
        replay.cookies.set("gw_session", ticket)
        await asyncio.sleep(TTL_S + 1.2)
        again = await replay.get("/inbox", headers=HTML)
        assert again.status_code == 302  # past the TTL: the gateway was asked and said no
        assert (await replay.get("/inbox", headers={"accept": "application/json"})).status_code == 401
