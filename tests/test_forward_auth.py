"""Forward-auth behind a real nginx: ``deploy/nginx/forward-auth.conf`` filled in with loopback
ports, nginx (``auth_request``) in front, the gateway on uvicorn answering ``/_gateway/*`` (its
own app must never be reached: nginx sends app traffic to the upstream), the echo app as the
upstream, the Lark emulator on its own ports. Every hop is a real HTTP request."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
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

from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from tests.conftest import (
    BROWSER_UA,
    HTML,
    ConfigFactory,
    GatewayStarter,
    NginxStarter,
    ServedLark,
    browser_login,
    echo_app,
    free_port,
    headers_of,
)

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "forward-auth.conf"
ZHANG = "ou_7dab8a3d3cdcc9da365777c7ad535d62"
TENANT = "736588c9260f175d"
TARGET = "/inbox?x=1&y=a%2Fb"
SPOOFED = [
    ("X-Auth-User", "admin"), ("x-auth-tenant", "evil-tenant"), ("X_Auth_User", "root"),
    ("X-AUTH-NAME", "Mallory"), ("X-Auth-Identity", "forged.jwt.token"), ("X-Auth-Access-Token", "stolen"),
    ("X-Auth-Provider", "none"), ("X-Other", "kept"),
]


def fill(template: str, **ports: int) -> str:
    """The template with its ``${NAME}`` placeholders replaced (and none left over)."""
    for name, port in ports.items():
        placeholder = "${" + name + "}"
        assert placeholder in template, f"{placeholder} is not in {TEMPLATE}"
        template = template.replace(placeholder, str(port))
    leftover = [name for name in ("LISTEN_PORT", "GATEWAY_PORT", "APP_PORT") if "${" + name + "}" in template]
    assert not leftover, leftover
    return template


@dataclass
class Site:
    url: str  # nginx, the only origin the client talks to
    gateway: AuthGateway
    gateway_app_hits: list[str]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": BROWSER_UA}, timeout=10)


@pytest.fixture
async def site(make_config: ConfigFactory, start_nginx: NginxStarter) -> AsyncIterator[Site]:
    hits: list[str] = []

    async def not_here(request: Request) -> Response:
        hits.append(request.url.path)
        return PlainTextResponse("forward-auth: app traffic goes to the upstream, not here", status_code=500)

    listen = free_port()
    config = make_config(public_url=f"http://127.0.0.1:{listen}", access={"public_paths": ["/public/*"],
                                                                                 "trusted_proxies": ["127.0.0.1/32"]})
    gateway = AuthGateway(Starlette(routes=[Route("/{path:path}", not_here, methods=["GET", "POST", "HEAD"])]),
                          config)
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls = await stack.enter_async_context(serve_apps({"gateway": gateway, "app": echo_app()}))
            conf = fill(TEMPLATE.read_text(), LISTEN_PORT=listen, GATEWAY_PORT=urlsplit(urls["gateway"]).port or 0,
                        APP_PORT=urlsplit(urls["app"]).port or 0)
            url = await stack.enter_async_context(start_nginx(conf, listen))
            yield Site(url, gateway, hits)
    finally:
        await gateway.aclose()
    assert hits == [], "nginx sent app traffic to the gateway's own app"


async def test_without_a_session_a_browser_is_sent_to_the_login_page(site: Site) -> None:
    async with site.client() as client:
        answer = await client.get(TARGET, headers=HTML)
    assert answer.status_code == 302
    # next= carries the whole original path and query, percent-encoded (no parameter is lost).
    assert answer.headers["location"] == "/_gateway/login?next=" + quote(TARGET, safe="")


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


async def test_the_browser_oauth_flow_through_nginx_ends_on_the_upstream_with_an_identity(
    site: Site, lark: ServedLark
) -> None:
    async with site.client() as client:
        answer = await browser_login(client, TARGET)
        assert answer.status_code == 200, answer.text
        assert str(answer.url) == site.url + TARGET
        # Every hop went through nginx: the OAuth redirect_uri is nginx's origin too.
        hops = [str(hop.url) for hop in answer.history]
        assert any(hop.startswith(site.url + "/_gateway/callback/lark?") for hop in hops), hops
        authorize = next(hop for hop in answer.history if "/authen/v1/authorize" in str(hop.url))
        redirect_uri = parse_qs(urlsplit(str(authorize.url)).query)["redirect_uri"][0]
        assert redirect_uri == site.url + "/_gateway/callback/lark"

        echoed = answer.json()
        assert echoed["path"] == "/inbox" and parse_qs(echoed["query"]) == {"x": ["1"], "y": ["a/b"]}
        received = headers_of(answer)
        assert received["x-auth-user"] == [ZHANG]
        assert received["x-auth-provider"] == ["lark"]
        assert received["x-auth-tenant"] == [TENANT]
        assert unquote(received["x-auth-name"][0]) == "张三"
        assert "x-auth-access-token" not in received  # pass_access_token is off
        assert echoed["cookies"] == {}  # the session ticket stays between the browser and nginx

        jwks = (await client.get("/_gateway/jwks.json")).json()
        claims = jwt.decode(received["x-auth-identity"][0], jwt.PyJWK(jwks["keys"][0]).key, algorithms=["EdDSA"],
                            audience="upstream", issuer=site.url)
        assert claims["user"] == ZHANG and claims["tenant"] == TENANT

        me = await client.get("/_gateway/me")
        assert me.json() == {"provider": "lark", "user": ZHANG, "tenant": TENANT, "name": "张三"}

        # Other cookies still reach the app, in any position around the session cookie.
        client.cookies.set("theme", "dark")
        client.cookies.set("lang", "zh")
        assert (await client.get("/x")).json()["cookies"] == {"theme": "dark", "lang": "zh"}
    stats = lark.sandbox.stats
    assert stats["authorize"] == 1 and stats["authorization_code"] == 1


@pytest.mark.parametrize("cookie", [
    "gw_session={t}", "gw_session={t}; theme=dark", "theme=dark; gw_session={t}",
    "a=1; gw_session={t}; theme=dark", "gw_session_x=1; gw_session={t}",
])
async def test_the_session_cookie_is_removed_wherever_it_sits(site: Site, cookie: str) -> None:
    async with site.client() as client:
        await browser_login(client)
        ticket = client.cookies["gw_session"]
        client.cookies.clear()
        answer = await client.get("/c", headers={"cookie": cookie.format(t=ticket)})
    assert answer.status_code == 200
    expected = {part.split("=")[0]: part.split("=")[1] for part in cookie.split("; ") if "{t}" not in part}
    assert answer.json()["cookies"] == expected
    assert ticket not in str(answer.json()["headers"])


async def test_spoofed_identity_headers_never_reach_the_upstream(site: Site) -> None:
    spoofed = httpx.Headers(SPOOFED)
    async with site.client() as client:
        public = await client.get("/public/page", headers=spoofed)
        assert public.status_code == 200
        received = headers_of(public)
        assert not [name for name in received if name.startswith(("x-auth", "x_auth"))], received
        assert received["x-other"] == ["kept"]

        refused = await client.get("/private", headers={**spoofed, "accept": "application/json"})
        assert refused.status_code == 401  # a forged identity is no identity

        await browser_login(client)
        private = await client.get("/private", headers=spoofed)
        received = headers_of(private)
        assert received["x-auth-user"] == [ZHANG]
        assert received["x-auth-tenant"] == [TENANT]
        assert received["x-auth-provider"] == ["lark"]
        assert unquote(received["x-auth-name"][0]) == "张三"
        assert received["x-auth-identity"] != ["forged.jwt.token"]
        assert "x-auth-access-token" not in received and "x_auth_user" not in received
        assert received["x-other"] == ["kept"]


async def test_public_paths_pass_without_identity_and_only_they_do(site: Site) -> None:
    async with site.client() as client:
        for path in ("/public/page", "/public/a/b?c=1"):
            answer = await client.get(path, headers=HTML)
            assert answer.status_code == 200 and answer.json()["path"] == path.split("?")[0]
        # The auth endpoint judges the original URI (X-Original-URI), normalized: no way out of /public.
        # And no way into a protected path dressed up as a public one: nginx passes $request_uri as
        # the client sent it, so a URI the gateway would have to rewrite is never public (finding 2).
        for escape in ("/public/../private", "/public/%2e%2e/private", "/public/..%2fprivate", "/publicity",
                       "/private/../public/x", "/private/%2e%2e/public/x", "/private/..%2fpublic/x",
                       "/private/..%2F..%2Fpublic/x", "/private/x//../../public/y", "/public//x"):
            answer = await client.get(escape, headers={"accept": "application/json"},
                                      extensions={"target": escape.encode()})  # sent as is, not normalized
            # 401 from /auth; nginx then asks the gateway for the login answer, whose edge may
            # refuse the ambiguous path outright (400 bad_path).
            assert answer.status_code in (400, 401), (escape, answer.status_code, answer.text)
        # The internal auth location is not reachable from outside.
        assert (await client.get("/_gateway/auth")).status_code == 404


async def test_after_logout_through_nginx_the_old_cookie_is_sent_to_login_again(site: Site) -> None:
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
        assert (await replay.get("/_gateway/me")).status_code == 401


async def test_a_client_naming_a_navigation_still_gets_the_login_answer_through_nginx(site: Site) -> None:
    # The gateway answers /auth with the login 302 when a trusted proxy names a navigation in
    # X-Forwarded-Method (Caddy, Traefik). nginx trusts itself and its auth subrequest carries the
    # client's headers, so the recipe asks with ?answer=status: still 401, then the 302 from the
    # @login_required hop, never a 302 on the first hop (auth_request would make it a 500).
    async with site.client() as client:
        navigation = await client.get(TARGET, headers={**HTML, "x-forwarded-method": "GET"})
        api = await client.get("/api/orders", headers={"accept": "application/json", "x-forwarded-method": "GET"})
        dressed = await client.post("/api/orders", data={"a": "1"}, headers={**HTML, "x-forwarded-method": "GET"})
    assert navigation.status_code == 302, navigation.text
    assert navigation.headers["location"] == "/_gateway/login?next=" + quote(TARGET, safe="")
    assert api.status_code == 401 and api.json()["error"] == "login_required"
    assert dressed.status_code == 401  # nginx names the real method on the second hop: a POST is no navigation


async def test_the_auth_endpoint_answers_a_proxy_named_navigation_with_the_login_302(
    start_gateway: GatewayStarter,
) -> None:
    # Asked directly, as Caddy's forward_auth and Traefik's ForwardAuth ask: no session.
    async with start_gateway(access={"trusted_proxies": ["127.0.0.1/32"],
                                     "forward_auth_uri_header": "X-Forwarded-Uri"}) as running, \
            running.client() as client:
        def ask(method: str, accept: str, query: str = "") -> Any:
            return client.get("/_gateway/auth" + query, headers={"accept": accept, "x-forwarded-method": method,
                                                                 "x-forwarded-uri": TARGET})
        navigation = await ask("GET", "text/html,application/xhtml+xml")
        head = await ask("HEAD", "text/html")
        api = await ask("GET", "application/json")
        post = await ask("POST", "text/html")
        status = await ask("GET", "text/html", "?answer=status")
        login = await ask("GET", "text/html", "?answer=login")
        unnamed = await client.get("/_gateway/auth", headers={**HTML, "x-forwarded-uri": TARGET})
    login_url = "/_gateway/login?next=" + quote(TARGET, safe="")
    for answer in (navigation, head, login):
        assert answer.status_code == 302 and answer.headers["location"] == login_url
    assert api.status_code == 401
    assert (api.json()["error"], api.json()["login_url"]) == ("login_required", login_url)
    assert post.status_code == 401 and "not signed in" in post.text  # a page: the browser asked for HTML
    for answer in (status, unnamed):  # nginx's auth_request: 401, whatever the Accept
        assert answer.status_code == 401 and answer.json()["login_url"] == login_url


async def test_a_client_cannot_name_the_method_to_the_auth_endpoint(start_gateway: GatewayStarter) -> None:
    # X-Forwarded-Method is believed from a trusted proxy only: from anyone else, the plain 401.
    async with start_gateway(access={"forward_auth_uri_header": "X-Forwarded-Uri"}) as running, \
            running.client() as client:
        answer = await client.get("/_gateway/auth", headers={**HTML, "x-forwarded-method": "GET",
                                                              "x-forwarded-uri": TARGET})
    assert answer.status_code == 401
    assert answer.json()["login_url"] == "/_gateway/login?next=" + quote("/", safe="")  # nor the URI


def test_the_forward_auth_answer_names_every_identity_header_for_each_identity(make_config: ConfigFactory) -> None:
    from gateway import handshake
    from gateway.handshake import AUTH_OK_HEADERS, ForwardAuthHeaders

    answers = ForwardAuthHeaders(make_config(identity={"headers": {"user": "X-User", "name": "X-User-Name"}}))
    names = [b"x-user", b"x-auth-provider", b"x-auth-tenant", b"x-user-name", b"x-auth-identity",
             b"x-auth-access-token"]
    full = [(b"x-user", b"u1"), (b"x-auth-provider", b"lark"), (b"x-auth-tenant", b"t1"), (b"x-user-name", b"n"),
            (b"x-auth-identity", b"jwt1"), (b"x-auth-access-token", b"at")]
    tenantless = [(b"x-user", b"u2"), (b"x-auth-provider", b"lark"), (b"x-auth-identity", b"jwt2")]

    def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        assert headers[:3] == list(AUTH_OK_HEADERS)
        assert len({key for key, _ in headers[3:]}) == len(headers[3:]) == len(names)  # each name once
        return dict(headers[3:])

    for _ in range(2):  # built, then found again: the same answers
        assert as_dict(answers(full)) == dict(full)
        assert as_dict(answers(tenantless)) == {**dict.fromkeys(names, b""), **dict(tenantless)}
        assert as_dict(answers([])) == dict.fromkeys(names, b"")
    # A caller may change the list it got without changing the next answer.
    answers(full).append((b"x-extra", b"1"))
    assert (b"x-extra", b"1") not in answers(full)
    # Past the bound the kept answers start over, still right.
    kept = [[(b"x-user", f"u{index}".encode())] for index in range(handshake._ANSWERS_KEPT + 10)]
    for identity in kept:
        assert as_dict(answers(identity))[b"x-user"] == identity[0][1]
    assert as_dict(answers(kept[0]))[b"x-user"] == b"u0"
