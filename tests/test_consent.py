"""Incremental consent (gateway/consent.py): a relayed call answered consent_required, the user
grants the missing scope (in the browser, and in the simulated Feishu client with real Chromium),
the new grant replaces the token record, and the call goes through."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Browser

from plugins.lark import openapi
from tests.conftest import FEISHU_UA, HTML, GatewayStarter, ServedLark, browser_login, open_simulated_client

CALENDARS = "/_gateway/api/lark/open-apis/calendar/v4/calendars"
ROUTES = [{"provider": "lark", "path": "open-apis/calendar/v4/*", "scopes": [openapi.CALENDAR_SCOPE]}]


def authorize_scopes(sent: list[httpx.URL]) -> list[str]:
    (url,) = [url for url in sent if url.path.endswith("/authen/v1/authorize")]
    return parse_qs(url.query.decode())["scope"][0].split(" ")


async def test_the_browser_consent_round_trip(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway(relay={"routes": ROUTES}) as running, running.client() as client:
        assert (await browser_login(client)).status_code == 200
        refused = await client.get(CALENDARS, headers={"referer": f"{running.url}/app/calendar"})
        assert refused.status_code == 403 and refused.json()["error"] == "consent_required"
        consent_url = refused.json()["consent_url"]
        visited: list[httpx.URL] = []

        async def note(response: httpx.Response) -> None:
            visited.append(response.request.url)

        client.event_hooks["response"].append(note)
        landed = await client.get(consent_url, headers=HTML, follow_redirects=True)
        assert landed.status_code == 200 and landed.json()["path"] == "/app/calendar"  # back to next
        assert authorize_scopes(visited) == ["offline_access", openapi.CALENDAR_SCOPE]
        answer = await client.get(CALENDARS)
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["calendar_list"]


@pytest.mark.parametrize("query,status,code", [
    ({"provider": "lark", "scopes": "contact:user.phone:readonly"}, 400, "scope_not_allowed"),
    ({"provider": "lark", "scopes": ""}, 400, "scope_not_allowed"),
    ({"provider": "lark", "scopes": "a b<script>"}, 400, "scope_not_allowed"),
    ({"provider": "nope", "scopes": openapi.CALENDAR_SCOPE}, 404, "unknown_provider"),
    ({"provider": "lark", "scopes": openapi.CALENDAR_SCOPE, "grant": "root"}, 400, "bad_request"),
])
async def test_consent_refuses_what_no_route_allows(start_gateway: GatewayStarter, lark: ServedLark,
                                                   query: dict[str, str], status: int, code: str) -> None:
    async with start_gateway(relay={"routes": ROUTES}) as running, running.client() as client:
        answer = await client.get("/_gateway/consent", params=query)
        assert answer.status_code == status and answer.json()["error"] == code
        assert lark.sandbox.stats["authorize"] == 0


async def test_consent_next_follows_the_login_rules(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway(relay={"routes": ROUTES}) as running, running.client() as client:
        answer = await client.get("/_gateway/consent", params={
            "provider": "lark", "scopes": openapi.CALENDAR_SCOPE, "next": "//evil.example/x"})
        assert answer.status_code == 302
        assert urlsplit(answer.headers["location"]).netloc == urlsplit(lark.urls["accounts"]).netloc
        landed = await client.get(answer.headers["location"], follow_redirects=True, headers=HTML)
        assert landed.status_code == 200 and landed.json()["path"] == "/"  # not the other site


async def test_the_in_client_consent_asks_the_jsapi_for_exactly_the_added_scopes(
        browser: Browser, start_gateway: GatewayStarter, lark: ServedLark) -> None:
    jssdk_url = lark.sandbox.demo_settings(lark.urls)["jssdk_url"]
    client = await open_simulated_client(browser, user_agent=FEISHU_UA, init_script=None)
    requested: list[Any] = []

    def on_request(request: Any) -> None:
        if request.url.endswith("/_sandbox/jsapi/code") and request.method == "POST":
            requested.append(request.post_data_json)

    client.page.on("request", on_request)
    async with start_gateway(relay={"routes": ROUTES}, provider={"jssdk_url": jssdk_url}) as running:
        await client.page.goto(f"{running.url}/app", wait_until="commit")
        await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)  # signed in silently
        refused = await client.page.evaluate(f"fetch('{CALENDARS}').then(r => r.json().then(b => [r.status, b]))")
        assert refused[0] == 403 and refused[1]["error"] == "consent_required"
        await client.page.goto(running.url + refused[1]["consent_url"], wait_until="commit")
        await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)  # next: the calling page
        answer = await client.page.evaluate(f"fetch('{CALENDARS}').then(r => r.status)")
        assert answer == 200
    assert [body["scopeList"] for body in requested] == [
        ["offline_access"], ["offline_access", openapi.CALENDAR_SCOPE]]
    assert len(client.exchanges) == 2 and not client.errors
