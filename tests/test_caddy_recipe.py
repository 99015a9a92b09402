"""Forward-auth behind a real Caddy: ``deploy/caddy/Caddyfile`` (Debian's caddy 2.6) in front,
the gateway on uvicorn answering ``/_gateway/*`` (its own app must never be reached), the echo app
as the upstream, the Lark emulator on its own ports. Every hop is a real HTTP request.

Issue 13 found four things wrong with Caddy 2.6.2 and a recipe copied from nginx's, each tested
here: (a) a browser without a session got the 401 JSON instead of the login 302; (b) a client's
``X_Auth_User`` reached the app; (c) a header the gateway's 200 left out reached the app as Caddy's
literal placeholder (``{http.reverse_proxy.header.X-Auth-Tenant}``); (d) ``gw_session`` reached
the app."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.config import IdentityHeaders
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from plugins.lark.sandbox import DEFAULT_USERS, LarkSandbox
from tests.conftest import (
    BROWSER_UA,
    HTML,
    ConfigFactory,
    ServedLark,
    browser_login,
    echo_app,
    free_port,
    headers_of,
    wait_listening,
)

RECIPE = Path(__file__).resolve().parents[1] / "deploy" / "caddy" / "Caddyfile"
ZHANG = DEFAULT_USERS[0]
# A user the emulator knows by open_id alone: no tenant, no name (the headers the gateway's 200
# used to leave out, which Caddy 2.6 then sent as its placeholder).
NAMELESS = replace(DEFAULT_USERS[1], open_id="ou_00000000000000000000000000000a11", tenant_key="", name="",
                   en_name="")
TARGET = "/inbox?x=1&y=a%2Fb"
IDENTITY_NAMES = [name.lower() for name in IdentityHeaders().model_dump().values()]
# Every spelling a client may try: the canonical one, other cases, underscores (which Caddy, unlike
# nginx, passes on), mixed separators, none.
SPOOFED = [
    ("X-Auth-User", "admin"), ("x-auth-tenant", "evil-tenant"), ("X_Auth_User", "root"), ("x_auth_user", "root2"),
    ("X-AUTH_NAME", "Mallory"), ("X_Auth-Provider", "none"), ("XAuthUser", "root3"),
    ("X-Auth-Identity", "forged.jwt.token"), ("X_AUTH_IDENTITY", "forged.again"), ("X-Auth-Access-Token", "stolen"),
    ("X-Other", "kept"),
]
PLACEHOLDER = "{http."


@pytest.fixture
async def lark() -> AsyncIterator[ServedLark]:
    """The Lark emulator (as tests/conftest.py serves it) with one more user: ``NAMELESS``."""
    sandbox = LarkSandbox(users=(*DEFAULT_USERS, NAMELESS))
    async with serve_apps(sandbox.hosts()) as urls:
        yield ServedLark(sandbox, urls)


def _caddy_binary() -> str:
    path = os.environ.get("GATEWAY_TEST_CADDY", "/usr/bin/caddy")
    if not os.access(path, os.X_OK):
        pytest.fail(f"Caddy is needed at {path}: install it (apt-get install caddy) or set GATEWAY_TEST_CADDY")
    return path


def _caddy_main(workdir: Path) -> Path:
    """A main Caddyfile in ``workdir``: no admin endpoint (several Caddies may run at once), and
    the recipe as its one site."""
    workdir.mkdir()
    main = workdir / "Caddyfile"
    main.write_text("{\n\tadmin off\n}\n" f"import {RECIPE}\n")
    return main


@contextlib.asynccontextmanager
async def running_caddy(workdir: Path, port: int, gateway: str, app: str) -> AsyncIterator[str]:
    """``caddy run`` in the foreground serving the recipe, everything under ``workdir``; its URL
    once it listens."""
    main = _caddy_main(workdir)
    env = {**os.environ, "HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data"),
           "XDG_CONFIG_HOME": str(workdir / "config"),
           "SITE_ADDRESS": f"http://127.0.0.1:{port}", "GATEWAY": gateway, "APP": app}
    log = workdir / "caddy.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            _caddy_binary(), "run", "--config", str(main), "--adapter", "caddyfile",
            env=env, stdout=output, stderr=output)
    try:
        # A loaded machine: Caddy's start is bounded, not timed.
        if not await wait_listening(port, process, 30):
            pytest.fail(f"Caddy did not start:\n{log.read_text(errors='replace')}")
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()  # Caddy stops gracefully on SIGTERM
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@dataclass
class Site:
    url: str  # Caddy, the only origin the client talks to
    gateway_url: str  # the gateway itself, for the questions Caddy asks it
    lark: ServedLark

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": BROWSER_UA}, timeout=20)


SiteFactory = Callable[..., Any]


@pytest.fixture
def start_site(make_config: ConfigFactory, lark: ServedLark, tmp_path: Path) -> SiteFactory:
    """``async with start_site(**config_sections) as site``: the gateway, the echo app and Caddy."""

    @contextlib.asynccontextmanager
    async def start(**sections: Any) -> AsyncIterator[Site]:
        hits: list[str] = []

        async def not_here(request: Request) -> Response:
            hits.append(request.url.path)
            return PlainTextResponse("forward-auth: app traffic goes to the upstream, not here", status_code=500)

        listen = free_port()
        access = {"public_paths": ["/public/*"], "trusted_proxies": ["127.0.0.1/32"],
                  "forward_auth_uri_header": "X-Forwarded-Uri", **sections.pop("access", {})}
        config = make_config(public_url=f"http://127.0.0.1:{listen}", access=access, **sections)
        gateway = AuthGateway(Starlette(routes=[Route("/{path:path}", not_here, methods=["GET", "POST", "HEAD"])]),
                              config)
        try:
            async with contextlib.AsyncExitStack() as stack:
                urls = await stack.enter_async_context(serve_apps({"gateway": gateway, "app": echo_app()}))
                url = await stack.enter_async_context(running_caddy(
                    tmp_path / f"caddy-{listen}", listen, urlsplit(urls["gateway"]).netloc,
                    urlsplit(urls["app"]).netloc))
                yield Site(url, urls["gateway"], lark)
        finally:
            await gateway.aclose()
        assert hits == [], "Caddy sent app traffic to the gateway's own app"

    return start


@pytest.fixture
async def site(start_site: SiteFactory) -> AsyncIterator[Site]:
    async with start_site() as running:
        yield running


def _no_placeholder(received: dict[str, list[str]]) -> None:
    leaked = {name: values for name, values in received.items() if any(PLACEHOLDER in value for value in values)}
    assert not leaked, f"Caddy placeholders reached the app: {leaked}"


# -- (a) no session: the answer the gateway gives in front of an app -----------------------------

async def test_without_a_session_a_browser_is_sent_to_the_login_page(site: Site) -> None:
    async with site.client() as client:
        answer = await client.get(TARGET, headers=HTML)
        head = await client.head(TARGET, headers=HTML)
    assert answer.status_code == 302, answer.text
    # next= carries the whole original path and query, percent-encoded (no parameter is lost).
    assert answer.headers["location"] == "/_gateway/login?next=" + quote(TARGET, safe="")
    assert answer.headers["cache-control"] == "no-store"
    assert head.status_code == 302 and head.headers["location"] == answer.headers["location"]


async def test_without_a_session_an_api_request_gets_401_json(site: Site) -> None:
    async with site.client() as client:
        api = await client.get("/api/orders?page=2", headers={"accept": "application/json"})
        post = await client.post("/api/orders", json={"a": 1})
        form = await client.post("/api/orders", data={"a": "1"}, headers=HTML)  # not a navigation: no 302
    for answer in (api, post):
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "login_required"
    assert api.json()["login_url"] == "/_gateway/login?next=" + quote("/api/orders?page=2", safe="")
    assert post.json()["login_url"] == "/_gateway/login?next=" + quote("/api/orders", safe="")
    assert form.status_code == 401 and "not signed in" in form.text


async def test_the_browser_oauth_flow_through_caddy_ends_on_the_upstream_with_an_identity(site: Site) -> None:
    async with site.client() as client:
        answer = await browser_login(client, TARGET)
        assert answer.status_code == 200, answer.text
        assert str(answer.url) == site.url + TARGET
        # Every hop went through Caddy: the OAuth redirect_uri is Caddy's origin too.
        authorize = next(hop for hop in answer.history if "/authen/v1/authorize" in str(hop.url))
        assert parse_qs(urlsplit(str(authorize.url)).query)["redirect_uri"][0] == site.url + "/_gateway/callback/lark"

        echoed = answer.json()
        assert echoed["path"] == "/inbox" and parse_qs(echoed["query"]) == {"x": ["1"], "y": ["a/b"]}
        received = headers_of(answer)
        assert received["x-auth-user"] == [ZHANG.open_id]
        assert received["x-auth-provider"] == ["lark"]
        assert received["x-auth-tenant"] == [ZHANG.tenant_key]
        assert unquote(received["x-auth-name"][0]) == ZHANG.name
        assert received["host"] == [urlsplit(site.url).netloc]  # the browser's Host, for the app's own checks
        assert "x-auth-access-token" not in received  # pass_access_token is off
        _no_placeholder(received)
        assert echoed["cookies"] == {}  # (d) the session ticket stays between the browser and Caddy

        jwks = (await client.get("/_gateway/jwks.json")).json()
        claims = jwt.decode(received["x-auth-identity"][0], jwt.PyJWK(jwks["keys"][0]).key, algorithms=["EdDSA"],
                            audience="upstream", issuer=site.url)
        assert claims["user"] == ZHANG.open_id and claims["tenant"] == ZHANG.tenant_key
    stats = site.lark.sandbox.stats
    assert stats["authorize"] == 1 and stats["authorization_code"] == 1


async def test_after_logout_the_old_cookie_is_sent_to_login_again(site: Site) -> None:
    async with site.client() as client:
        await browser_login(client)
        ticket = client.cookies["gw_session"]
        assert (await client.get("/inbox", headers=HTML)).status_code == 200
        out = await client.post("/_gateway/logout", headers={"origin": site.url})
        assert out.status_code == 200 and out.json() == {"ok": True}
    async with site.client() as replay:
        replay.cookies.set("gw_session", ticket)
        again = await replay.get("/inbox", headers=HTML)
        assert again.status_code == 302
        assert again.headers["location"] == "/_gateway/login?next=" + quote("/inbox", safe="")


# -- (b) identity headers from the client never pass, in any spelling ----------------------------

async def test_spoofed_identity_headers_never_reach_the_upstream(site: Site) -> None:
    async with site.client() as client:
        public = await client.get("/public/page", headers=SPOOFED)
        assert public.status_code == 200, public.text
        received = headers_of(public)
        assert not [name for name in received if name.replace("_", "-").startswith(("x-auth", "xauth"))], received
        assert received["x-other"] == ["kept"]

        refused = await client.get("/private", headers=[*SPOOFED, ("accept", "application/json")])
        assert refused.status_code == 401  # a forged identity is no identity

        await browser_login(client)
        private = await client.get("/private", headers=SPOOFED)
        assert private.status_code == 200, private.text
        received = headers_of(private)
        assert received["x-auth-user"] == [ZHANG.open_id]
        assert received["x-auth-tenant"] == [ZHANG.tenant_key]
        assert received["x-auth-provider"] == ["lark"]
        assert unquote(received["x-auth-name"][0]) == ZHANG.name
        assert received["x-auth-identity"] != ["forged.jwt.token"] and len(received["x-auth-identity"]) == 1
        # Only the gateway's own, canonical headers: no other spelling, no access token.
        assert sorted(name for name in received if name.replace("_", "-").startswith(("x-auth", "xauth"))) == \
            sorted(["x-auth-user", "x-auth-provider", "x-auth-tenant", "x-auth-name", "x-auth-identity"])
        assert received["x-other"] == ["kept"]
        _no_placeholder(received)


# -- (c) a header the identity lacks is no header, never Caddy's placeholder ----------------------

async def test_the_gateway_answers_every_identity_header_to_forward_auth(site: Site) -> None:
    # Asked as Caddy asks (from 127.0.0.1, a trusted proxy): a public path's 200 names every identity
    # header, empty, so that a proxy copying them has a value for each.
    async with httpx.AsyncClient(base_url=site.gateway_url, timeout=20) as gateway:
        public = await gateway.get("/_gateway/auth", headers={"x-forwarded-uri": "/public/x",
                                                               "x-forwarded-method": "GET"})
    assert public.status_code == 200
    assert {name: public.headers.get(name) for name in IDENTITY_NAMES} == dict.fromkeys(IDENTITY_NAMES, "")
    # Signed in (the middleware's hot path answers): the known ones, and the access token empty.
    async with site.client() as client:
        await browser_login(client)
        ticket = client.cookies["gw_session"]
    async with httpx.AsyncClient(base_url=site.gateway_url, timeout=20) as gateway:
        signed_in = await gateway.get("/_gateway/auth", headers={"x-forwarded-uri": "/x", "x-forwarded-method": "GET",
                                                                  "cookie": f"gw_session={ticket}"})
    assert signed_in.status_code == 200
    answered = {name: signed_in.headers.get_list(name) for name in IDENTITY_NAMES}
    assert answered["x-auth-user"] == [ZHANG.open_id] and answered["x-auth-tenant"] == [ZHANG.tenant_key]
    assert answered["x-auth-access-token"] == [""]  # pass_access_token is off: named, empty
    assert all(len(values) == 1 for values in answered.values()), answered


async def test_public_paths_pass_without_identity_and_without_placeholders(site: Site) -> None:
    async with site.client() as client:
        for path in ("/public/page", "/public/a/b?c=1"):
            answer = await client.get(path, headers=HTML)
            assert answer.status_code == 200 and answer.json()["path"] == path.split("?")[0]
            received = headers_of(answer)
            assert not [name for name in received if name.startswith("x-auth")], received
            _no_placeholder(received)
        # Signed in too: a public path is answered without identity, as in the gateway's other modes.
        await browser_login(client)
        signed_in = headers_of(await client.get("/public/page"))
        assert not [name for name in signed_in if name.startswith("x-auth")], signed_in
        _no_placeholder(signed_in)
        # No way into a protected path dressed up as a public one, sent as is (not normalized).
        for escape in ("/public/../private", "/public/%2e%2e/private", "/public/..%2fprivate", "/publicity"):
            client.cookies.clear()
            answer = await client.get(escape, headers={"accept": "application/json"},
                                      extensions={"target": escape.encode()})
            assert answer.status_code in (400, 401), (escape, answer.status_code, answer.text)


async def test_a_user_without_tenant_or_name_gets_no_such_headers(site: Site) -> None:
    site.lark.sandbox.set_current_user(NAMELESS.open_id)
    async with site.client() as client:
        answer = await browser_login(client, "/x")
        assert answer.status_code == 200, answer.text
        received = headers_of(answer)
        client.cookies.set("theme", "dark")
        spoofed = headers_of(await client.get("/x", headers=SPOOFED))
    assert received["x-auth-user"] == [NAMELESS.open_id] and received["x-auth-provider"] == ["lark"]
    for headers in (received, spoofed):
        assert "x-auth-tenant" not in headers and "x-auth-name" not in headers, headers
        assert "x-auth-access-token" not in headers
        _no_placeholder(headers)


async def test_the_access_token_is_copied_when_passed(start_site: SiteFactory) -> None:
    async with start_site(identity={"pass_access_token": True}) as running, running.client() as client:
        received = headers_of(await browser_login(client, "/x"))
        spoofed = headers_of(await client.get("/x", headers=SPOOFED))
    for headers in (received, spoofed):
        assert len(headers["x-auth-access-token"]) == 1 and headers["x-auth-access-token"] != ["stolen"]
        # The user access token the emulator issued (its record of them, keyed by token).
        assert headers["x-auth-access-token"][0] in running.lark.sandbox._access
        _no_placeholder(headers)


# -- (d) the gateway's session cookie never reaches the app ---------------------------------------

@pytest.mark.parametrize("cookie", [
    "gw_session={t}", "gw_session={t}; theme=dark", "theme=dark; gw_session={t}",
    "a=1; gw_session={t}; theme=dark", "gw_session_x=1; gw_session={t}",
    "gw_session={t}; theme=dark; gw_session={t}", "x=1;gw_session={t};y=2",
])
async def test_the_session_cookie_is_removed_wherever_it_sits(site: Site, cookie: str) -> None:
    async with site.client() as client:
        await browser_login(client)
        ticket = client.cookies["gw_session"]
        client.cookies.clear()
        answer = await client.get("/c", headers={"cookie": cookie.format(t=ticket)})
    assert answer.status_code == 200, answer.text
    expected = dict(part.strip().split("=") for part in cookie.split(";") if "{t}" not in part)
    assert answer.json()["cookies"] == expected
    assert ticket not in str(answer.json()["headers"])
    assert headers_of(answer)["x-auth-user"] == [ZHANG.open_id]
    sent = headers_of(answer).get("cookie", [])
    assert (sent == []) == (expected == {}), sent  # no Cookie header left when nothing is left in it


async def test_the_gateway_endpoints_pass_but_not_the_metrics_nor_auth(site: Site) -> None:
    async with site.client() as client:
        metrics = await client.get("/_gateway/metrics")
        auth = await client.get("/_gateway/auth", headers={"x-forwarded-uri": "/public/x"})
        healthz = await client.get("/_gateway/healthz")
    assert metrics.status_code == 404 and "gateway_requests_total" not in metrics.text
    assert auth.status_code == 404
    assert healthz.status_code == 200 and healthz.json() == {"status": "ok"}


async def test_a_client_cannot_name_the_uri_or_the_method_the_gateway_judges(site: Site) -> None:
    # forward_auth sets X-Forwarded-Uri and X-Forwarded-Method from the request itself; a client's
    # X-Original-URI reaches the gateway but is not the header it reads (forward_auth_uri_header).
    claims = {"x-forwarded-uri": "/public/x", "x-original-uri": "/public/x", "x-forwarded-method": "GET"}
    async with site.client() as client:
        api = await client.get("/private", headers={**claims, "accept": "application/json"})
        form = await client.post("/private", data={"a": "1"}, headers={**claims, **HTML})
    assert api.status_code == 401 and api.json()["login_url"] == "/_gateway/login?next=" + quote("/private", safe="")
    assert form.status_code == 401  # a POST stays no navigation, whatever the client says
