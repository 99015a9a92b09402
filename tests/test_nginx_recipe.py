"""Issue 10, finding 16: the nginx recipes (``deploy/nginx/forward-auth.conf`` and
``forward-auth-cache.conf``) drop *every* copy of the gateway's session cookie before the app
(a browser may hold several: one per Domain or Path a sibling site set), refuse a request with
more copies than they can drop, and never serve ``/_gateway/metrics`` (nginx connects from
127.0.0.1, so a loopback allowance would serve every visitor). Real nginx, as in
tests/test_forward_auth.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from tests.conftest import BROWSER_UA, ConfigFactory, NginxStarter, browser_login, echo_app, free_port, headers_of

RECIPES = Path(__file__).resolve().parents[1] / "deploy" / "nginx"


def fill(template: str, **values: object) -> str:
    for name, value in values.items():
        template = template.replace("${" + name + "}", str(value))
    assert "${" not in template, "a placeholder is left"
    return template


@pytest.fixture(params=["forward-auth.conf", "forward-auth-cache.conf"])
async def site(request: pytest.FixtureRequest, make_config: ConfigFactory, start_nginx: NginxStarter,
               tmp_path: Path) -> AsyncIterator[str]:
    async def not_here(request: Request) -> Response:
        return PlainTextResponse("app traffic goes to the upstream", status_code=500)

    listen = free_port()
    config = make_config(public_url=f"http://127.0.0.1:{listen}",
                         access={"public_paths": ["/public/*"], "trusted_proxies": ["127.0.0.1/32"]})
    gateway = AuthGateway(Starlette(routes=[Route("/{path:path}", not_here)]), config)
    try:
        async with contextlib.AsyncExitStack() as stack:
            urls = await stack.enter_async_context(serve_apps({"gateway": gateway, "app": echo_app()}))
            conf = fill((RECIPES / request.param).read_text(), LISTEN_PORT=listen,
                        GATEWAY_PORT=urlsplit(urls["gateway"]).port, APP_PORT=urlsplit(urls["app"]).port,
                        CACHE_DIR=tmp_path / "auth-cache")
            yield await stack.enter_async_context(start_nginx(conf, listen))
    finally:
        await gateway.aclose()


def _client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"user-agent": BROWSER_UA}, timeout=10)


def _app_cookie_header(answer: httpx.Response) -> str:
    return "; ".join(headers_of(answer).get("cookie", []))


@pytest.mark.parametrize("cookie", [
    "gw_session=a; gw_session=b",
    "theme=dark; gw_session=a; lang=zh; gw_session=b",
    "gw_session=a; gw_session=b; gw_session=c; theme=dark",
    "x=1; gw_session=a; gw_session=b; y=2; gw_session=c; gw_session=d",
])
async def test_every_copy_of_the_session_cookie_is_dropped(site: str, cookie: str) -> None:
    async with _client(site) as client:
        answer = await client.get("/public/page", headers={"cookie": cookie})
    assert answer.status_code == 200, answer.text
    sent = _app_cookie_header(answer)
    assert "gw_session" not in sent, sent
    others = [part for part in cookie.split("; ") if not part.startswith("gw_session=")]
    assert answer.json()["cookies"] == dict(part.split("=") for part in others)


async def test_a_signed_in_browser_with_duplicate_cookies_keeps_its_ticket_from_the_app(site: str) -> None:
    async with _client(site) as client:
        assert (await browser_login(client, "/x")).status_code == 200
        ticket = client.cookies["gw_session"]
    async with _client(site) as client:
        answer = await client.get("/private", headers={"cookie": f"gw_session={ticket}; theme=dark; "
                                                                 f"gw_session={ticket}"})
    assert answer.status_code == 200, answer.text
    assert headers_of(answer)["x-auth-provider"] == ["lark"]
    assert ticket not in _app_cookie_header(answer) and answer.json()["cookies"] == {"theme": "dark"}


async def test_more_copies_than_the_recipe_drops_are_refused(site: str) -> None:
    cookie = "; ".join(f"gw_session=v{index}" for index in range(5))
    async with _client(site) as client:
        answer = await client.get("/public/page", headers={"cookie": cookie + "; theme=dark"})
        four = await client.get("/public/page", headers={"cookie": "; ".join(cookie.split("; ")[:4])})
    assert answer.status_code == 400
    assert four.status_code == 200


async def test_the_metrics_are_not_served_through_nginx(site: str) -> None:
    # Whatever the gateway would answer (metrics.allow_from: [127.0.0.1] would serve nginx), the
    # recipe answers 404 itself: Prometheus scrapes the gateway's own port.
    async with _client(site) as client:
        answer = await client.get("/_gateway/metrics")
        healthz = await client.get("/_gateway/healthz")
    assert answer.status_code == 404 and "gateway_requests_total" not in answer.text
    assert healthz.status_code == 200  # the gateway's other endpoints still pass
